"""Print a run's accuracy report and redraw its pictures (RUN_DIR/report/*.png) from its files, or
compare runs: a table on stdout (a row per run: recipe, the settings that differ, accuracy per TTA
view set, training time, device) and a picture of accuracy against training time. Needs matplotlib.

    python scripts/report.py runs/default            # or --run-dir runs/default
    python scripts/report.py --compare runs/r1 runs/r2 runs/fast --picture compare.png
"""

import argparse
import sys
from pathlib import Path

from kaggle_cifar import cli
from kaggle_cifar.errors import ToolError


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?", help="the run whose report to print and pictures to redraw")
    parser.add_argument("--run-dir", dest="run_dir_flag", type=Path, metavar="RUN_DIR", help="the same as RUN_DIR")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="RUN_DIR", help="finished runs to compare")
    parser.add_argument("--picture", type=Path, default=Path("compare.png"),
                        help="with --compare: where the accuracy-against-time picture goes (default: compare.png)")
    cli.add_input_flag(parser, of_the_run=True)
    cli.add_cache_flag(parser)
    args = parser.parse_args()
    args.run_dir = args.run_dir or args.run_dir_flag
    if (args.run_dir is None) == (args.compare is None):
        parser.error("give a RUN_DIR to redraw its pictures, or --compare RUN_DIR ...")
    from kaggle_cifar import plots  # after the flags: --help answers without loading torch
    from kaggle_cifar.rundir import RunDir

    if not plots.available():
        raise ToolError("the report pictures need matplotlib: pip install matplotlib")
    if args.compare:
        from kaggle_cifar import compare

        rows = [compare.row(RunDir(path)) for path in args.compare]
        print(compare.table(rows))
        print(f"picture: {compare.picture(rows, args.picture)}", file=sys.stderr)
        return 0
    from kaggle_cifar.data import cached_images, read_labels

    from kaggle_cifar.report import describe

    run = RunDir(args.run_dir)
    cfg, _ = run.read()  # first: a path that holds no run is named as such
    print(describe(run.read_report(), cfg.tta))
    cli.inputs_of_the_run(args, run)
    ids = read_labels(args.input).ids
    images = cached_images(args.input / "train", ids, cli.cache_dir_of(args))
    for path in plots.write_report(run, ids, images):
        print(path)
    return 0


if __name__ == "__main__":
    cli.run(main)
