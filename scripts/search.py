"""Hyperparameter search (Optuna): trials train fold 0 of a config drawn from the space, hopeless
ones are pruned by their per-epoch validation accuracy, and the best config is written for
train_folds.py --config.

    python scripts/search.py --space lr=0.005:0.1:log label_smoothing=0:0.3 batch_size=128,256 --trials 20 --epochs 10
    python scripts/search.py --space-file space.txt --timeout 3600       # the same, one NAME=... per line
    python scripts/train_folds.py --config runs/search/best_config.json   # then the whole k-fold run

Run it again with the same --run-dir to go on (a stopped trial resumes from its last epoch). Several
processes share one study through a database server: start the same command, with the same
--storage postgresql://... URL and a --run-dir on a shared filesystem, on each machine (or under
torchrun, one study for every rank).
"""

import argparse
import logging
import sys
from pathlib import Path

from kaggle_cifar import cli
from kaggle_cifar.config import add_config_flags, config_from_args

log = logging.getLogger("search")


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_io_flags(parser, run_dir=Path("runs/search"))
    cli.add_device_flags(parser)
    search = parser.add_argument_group("search")
    search.add_argument("--space", nargs="+", default=[], metavar="NAME=RANGE",
                        help="searched config fields: NAME=LOW:HIGH (uniform), NAME=LOW:HIGH:log, NAME=A,B,C (choices)")
    search.add_argument("--space-file", type=cli.Path, help="a file with one NAME=... per line (# comments)")
    search.add_argument("--trials", type=cli.positive_int, default=20,
                        help="finished trials (completed or pruned) the study should hold (default: 20)")
    search.add_argument("--timeout", type=cli.duration, default=None, metavar="DURATION",
                        help="stop starting trials after this long, e.g. 900, 45m or 2h")
    search.add_argument("--storage", default=None,
                        help="Optuna database URL to share a study between processes or machines, e.g. "
                             "postgresql://host/db (default: sqlite in RUN_DIR/study.db)")
    search.add_argument("--prune", action=argparse.BooleanOptionalAction, default=True,
                        help="stop trials whose per-epoch validation accuracy is below the median of earlier "
                             "trials at the same epoch (default: on)")
    add_config_flags(parser)
    args = parser.parse_args()
    base = config_from_args(args)
    from kaggle_cifar import distributed  # after the flags: --help answers without loading torch
    from kaggle_cifar.rundir import SearchDir
    from kaggle_cifar.search import check_storage, parse_space, read_space_file, run_search, summary

    space = parse_space(args.space + (read_space_file(args.space_file) if args.space_file else []))
    check_storage(distributed.launched_world_size(), args.storage)  # said by every rank before any waits on another
    ctx = distributed.setup(args.device, args.precision, args.compile)
    try:
        cli.resolve_paths(args, ctx)
        search_dir = SearchDir(args.run_dir)
        study = run_search(base, space, args.input, search_dir, args.cache_dir, ctx, args.trials, args.timeout,
                           args.storage, args.prune)
    finally:
        distributed.teardown(ctx)
    print(summary(study, search_dir), file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main, interrupted="the study is kept; run the same command again to go on (the stopped trial resumes)")
