"""Stratified k-fold training: one model per fold, OOF predictions and the CV accuracy.

    python scripts/train_folds.py                                 # defaults: 5 folds, ResNet18
    torchrun --nproc_per_node=8 scripts/train_folds.py            # folds in parallel, fold k on rank k mod 8
"""

import argparse
import logging
import sys

from kaggle_cifar import cli
from kaggle_cifar.config import add_config_flags, config_from_args

log = logging.getLogger("train_folds")


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_io_flags(parser)
    cli.add_device_flags(parser)
    parser.add_argument("--check", action="store_true",
                        help="validate the input (labels, every train and test image) and exit without training")
    add_config_flags(parser)
    args = parser.parse_args()
    cfg = config_from_args(args)
    from kaggle_cifar import distributed  # after the flags: --help answers without loading torch
    from kaggle_cifar.cv import check_input, train_folds
    from kaggle_cifar.report import describe

    ctx = distributed.setup(args.device, args.precision, args.compile)
    try:
        cli.resolve_paths(args, ctx)
        if args.check:
            if ctx.is_main:  # one decode of the input, not one per process
                log.info(check_input(args.input, args.cache_dir, cfg.folds))
            return 0
        summary = train_folds(cfg, args.input, args.run_dir, args.cache_dir, ctx)
    finally:
        distributed.teardown(ctx)
    if summary is not None:
        print(describe(summary, cfg.tta), file=sys.stderr)
        print(f"report: {args.run_dir / 'report.json'}", file=sys.stderr)
        print(f"next: python scripts/predict.py{cli.run_dir_flag(args.run_dir)} --output submissions/sub.csv",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main, interrupted="run the same command again to resume: finished folds are kept, and an unfinished "
                              "one goes on from its last finished epoch")
