"""One-call benchmark of the whole pipeline; prints a short table last.

    python bench/bench.py --input input                       # the default run, as a competitor runs it
    python bench/bench.py --input /tmp/cifar-small --folds 2 --epochs 4 --width 16    # CPU-sized

Measures, side by side: the training step and the forward pass in float32 eager (the reference)
and in the chosen precision and compile setting, and the forward pass compiled for inference with
frozen weights (what predict does on the CPU for a large set); then, from a cold cache, PNG decode
images/s (train and test), training images/s per fold (epochs after the first, so warm-up and
compilation stay out), epoch time, predict images/s per TTA view and fold, the wall time of the
whole pipeline (decode + k folds + predict + CSV), the model's training FLOPs per image and the
TFLOP/s they imply; then the run's accuracy report (CV, each fold with each TTA view set, and with
--holdout N the fold ensemble against single folds).
Run outputs go to a temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import Table, setting, warm_epochs  # bench/common.py, beside this script; first, before torch loads
import torch

from kaggle_cifar import cli, distributed
from kaggle_cifar.augment import TTA_VIEWS
from kaggle_cifar.config import add_config_flags, config_from_args
from kaggle_cifar.cv import train_folds
from kaggle_cifar.data import cached_images, image_ids, load_train, read_labels
from kaggle_cifar.budget import calibrate
from kaggle_cifar.device import Policy
from kaggle_cifar.folds import DeviceTrainSet, fold_split
from kaggle_cifar.model import training_flops_per_image
from kaggle_cifar.predict import submission_csv
from kaggle_cifar.report import describe
from kaggle_cifar.model import for_config
from kaggle_cifar.rundir import RunDir


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def autocast_name(policy: Policy) -> str:
    dtype = policy.autocast_dtype
    return "no autocast" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_input_flag(parser)
    cli.add_device_flags(parser)
    parser.add_argument("--speed-only", action="store_true",
                        help="only the side-by-side speed rows (float32 eager against the chosen setting), no pipeline")
    add_config_flags(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = config_from_args(args)
    ctx = distributed.setup(args.device, args.precision, args.compile)
    chosen = ctx.policy
    table = Table()

    def measured(what: str, rate: str, seconds: str) -> None:
        table.add(what=what, rate=rate, time=seconds)

    with tempfile.TemporaryDirectory() as tmp:
        cache, run_dir = Path(tmp) / "cache", Path(tmp) / "run"
        t_start = time.perf_counter()
        for folder, ids in (("train", read_labels(args.input).ids), ("test", image_ids(args.input / "test"))):
            _, seconds = timed(lambda: cached_images(args.input / folder, ids, cache))
            measured(f"decode {folder} (cold cache)", f"{len(ids) / seconds:,.0f} images/s", f"{seconds:.1f} s")
        train = load_train(args.input, cache, cfg.folds)
        fold = DeviceTrainSet.of(train, ctx.device).fold(fold_split(cfg, train.labels), 0)
        settings = [Policy.of(ctx.device, "float32", compile=False),
                    Policy.of(ctx.device, args.precision, compile=chosen.compile_training)]
        rates = {}
        for policy in dict.fromkeys(settings):
            name = f"{autocast_name(policy)}, {'compiled' if policy.compile_training else 'eager'}"
            step_seconds, image_seconds = calibrate(cfg, fold, policy, steps=24, images=8192)
            rates[policy] = min(cfg.batch_size, len(fold.train_targets)) / step_seconds, 1 / image_seconds
            train_rate, predict_rate = rates[policy]
            base_train, base_predict = rates[settings[0]]
            measured(f"training step, {name}", f"{train_rate:,.0f} images/s ({train_rate / base_train:.2f}x)", "")
            measured(f"forward pass, {name}", f"{predict_rate:,.0f} images/s per view ({predict_rate / base_predict:.2f}x; "
                                              f"{predict_rate / train_rate:.1f}x its training rate)", "")
        # predict's default on the CPU for a large set: the model compiled for inference, weights frozen
        _, image_seconds = calibrate(cfg, fold, settings[-1], steps=1, images=8192, forward_compiled=True)
        train_rate, predict_rate = rates[settings[-1]][0], 1 / image_seconds
        measured(f"forward pass, {autocast_name(chosen)}, compiled for inference (weights frozen)",
                 f"{predict_rate:,.0f} images/s per view ({predict_rate / rates[settings[0]][1]:.2f}x; "
                 f"{predict_rate / train_rate:.1f}x the training rate above)", "")
        if args.speed_only:
            print("\n" + setting(chosen, cfg) + "\n\n" + str(table))
            return
        summary, seconds = timed(lambda: train_folds(cfg, args.input, run_dir, cache, ctx))
        measured(f"train {cfg.folds} folds x {cfg.epochs} epochs", "", f"{seconds:.1f} s")
        print(describe(summary, cfg.tta), flush=True)
        warm_rates, epoch_times, checkpoint_times = [], [], []
        for fold in range(cfg.folds):
            warm = warm_epochs(RunDir(run_dir).fold(fold))
            warm_rates.append(warm["train_images_per_s"].median())
            epoch_times += warm["seconds"].tolist()
            checkpoint_times += warm["checkpoint_seconds"].dropna().tolist()
            measured(f"train fold {fold} (after epoch 1)", f"{warm_rates[-1]:,.0f} images/s", "")
        measured("epoch time (median, incl. validation)", "", f"{statistics.median(epoch_times):.2f} s")
        measured("checkpoint save per epoch (median, not in the epoch time)", "",
                 f"{statistics.median(checkpoint_times):.3f} s")
        (csv, _), seconds = timed(lambda: submission_csv(args.input, [run_dir], cache, ctx))
        n_test, views = len(csv.splitlines()) - 1, len(TTA_VIEWS[cfg.tta])
        measured(f"predict {n_test:,} images, tta {cfg.tta} ({views} views), {cfg.folds} folds",
                 f"{n_test * views / seconds:,.0f} images/s per view", f"{seconds:.1f} s")
        measured("predict, per model forward pass", f"{n_test * views * cfg.folds / seconds:,.0f} images/s per view and fold", "")
        measured("whole pipeline (decode + train + predict + CSV)", "", f"{time.perf_counter() - t_start:.1f} s")

    model = for_config(cfg, 10).to(ctx.device)
    flops = training_flops_per_image(model, (3, 32, 32))
    rate = statistics.median(warm_rates)
    measured("training FLOPs per image", f"{flops / 1e9:.2f} GFLOP", f"{flops * rate / 1e12:.1f} TFLOP/s achieved")
    print("\n" + setting(chosen, cfg))
    print(describe(summary, cfg.tta) + "\n")
    print(str(table))


if __name__ == "__main__":
    main()
