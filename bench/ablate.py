"""Recipe ablation in one call: one fold trained with the default recipe and with variants that each
change one thing; prints held-out accuracy with each TTA view set, training time and images/s.

    python bench/ablate.py --input input                                  # every variant, fold 0
    python bench/ablate.py --input input --only default cutout_8 --epochs 15

Every variant is measured on the same held-out fold (the seed variant excepted: its split differs),
and the default is also run with another seed, so the table shows the seed-to-seed noise of a single
fold: a gain smaller than that gap is not a measured gain. A row is printed as soon as its variant
finishes, so a run cut short keeps what it measured; the whole table, in Markdown for
bench/RESULTS.md, comes last. Flags such as --epochs change the base every variant starts from.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from pathlib import Path

from common import Table, setting, warm_epochs  # bench/common.py, beside this script; first, before torch loads
import torch

from kaggle_cifar import cli, distributed
from kaggle_cifar.augment import TTA_VIEWS
from kaggle_cifar.config import add_config_flags, config_from_args
from kaggle_cifar.data import load_train
from kaggle_cifar.folds import DeviceTrainSet, fold_split
from kaggle_cifar.rundir import RunDir, folds_table
from kaggle_cifar.train import train_fold

# Each variant is the base config with these fields changed; the defaults stay what they are until
# a row of this table shows a gain above the seed noise.
VARIANTS = {
    "default": {},
    "default_seed1": {"seed": 1},
    "no_label_smoothing": {"label_smoothing": 0.0},
    "label_smoothing_0.2": {"label_smoothing": 0.2},
    "ema_0.999": {"ema_decay": 0.999},
    "lookahead": {"optimizer": "lookahead_muon"},
    "cutout_8": {"cutout": 8},
    # timm's Mixup on the device batch: CutMix on half the batches (on all epochs, or the first half
    # only: timm's --mixup-off-epoch), and Mixup alone.
    "cutmix": {"cutmix": 1.0, "mixup_prob": 0.5},
    "cutmix_first_half": {"cutmix": 1.0, "mixup_prob": 0.5, "mixup_epochs": 0.5},
    "mixup_0.2": {"mixup": 0.2},
    "randaugment": {"auto_augment": "randaugment"},
    "trivialaugment": {"auto_augment": "trivialaugment"},
    "crop_pad_2": {"crop_pad": 2},
    "crop_fill_reflect": {"crop_fill": "reflect"},
    "flip_alternate": {"flip": "alternate"},
    "flip_alternate_seed1": {"flip": "alternate", "seed": 1},
    "whiten_stem": {"whiten_stem": True},
    "whiten_bias_3": {"whiten_bias_epochs": 3},
    "batch_256_lr_0.03": {"batch_size": 256, "lr": 0.03},
    "batch_512_lr_0.04": {"batch_size": 512, "lr": 0.04},
    "lr_0.01": {"lr": 0.01},
    "lr_0.04": {"lr": 0.04},
    "decay_norm_and_bias": {"decay_norm_and_bias": True},
    "cosine_anneal": {"anneal": "cos"},
    "lamb_lr_0.01": {"optimizer": "lamb", "lr": 0.01, "weight_decay": 0.02},
    # Nesterov SGD at its own scale (the default before Muon), and without Nesterov.
    "sgd_lr_0.2": {"optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4},
    "momentum_not_nesterov": {"optimizer": "momentum", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4},
    "epochs_40": {"epochs": 40},
}


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_io_flags(parser, run_dir=None)  # a given --run-dir keeps each variant's run (and resumes it)
    cli.add_device_flags(parser)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT",
                        help=f"variants to run (default: all): {', '.join(VARIANTS)}")
    parser.add_argument("--fold", type=int, default=0, help="the fold every variant trains and is measured on")
    add_config_flags(parser)
    args = parser.parse_args()
    base = config_from_args(args)
    ctx = distributed.setup(args.device, args.precision, args.compile)
    cli.resolve_paths(args, ctx)
    train = load_train(args.input, args.cache_dir, base.folds)
    on_device = DeviceTrainSet.of(train, ctx.device)

    table = Table()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.run_dir or Path(tmp)
        for name in args.only:
            torch.compiler.reset()  # each variant compiles afresh: no dynamic-shape graph left by another batch size
            cfg = dataclasses.replace(base, **VARIANTS[name])
            fold_of = fold_split(cfg, train.labels)
            run = RunDir(out / name)
            run.create(cfg, train.labels.classes, folds_table(train.labels.ids, fold_of))
            result = train_fold(cfg, on_device.fold(fold_of, args.fold), run.fold(args.fold), ctx.policy)
            table.add(variant=name, changes=", ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or "-",
                      **{f"acc {tta}": f"{result['accuracy_by_tta'][tta]:.4f}" for tta in TTA_VIEWS},
                      **{"train s": f"{result['seconds']:.1f}",
                         "images/s": f"{warm_epochs(run.fold(args.fold))['train_images_per_s'].median():,.0f}"})
    print(f"\nablation on fold {args.fold} of {base.folds}, {len(train.labels.ids):,} training images; "
          f"every variant changes this base:\n{setting(ctx.policy, base)}")
    print(table)
    return 0


if __name__ == "__main__":
    cli.run(main)
