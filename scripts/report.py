"""Redraw a run's report pictures (RUN_DIR/report/*.png) from its files; needs matplotlib.

    python scripts/report.py runs/default
"""

import argparse
from pathlib import Path

from kaggle_cifar import cli
from kaggle_cifar.errors import ToolError


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    cli.add_input_flag(parser, of_the_run=True)
    cli.add_cache_flag(parser)
    args = parser.parse_args()
    from kaggle_cifar import plots  # after the flags: --help answers without loading torch
    from kaggle_cifar.data import cached_images, read_labels
    from kaggle_cifar.rundir import RunDir

    if not plots.available():
        raise ToolError("the report pictures need matplotlib: pip install matplotlib")
    run = RunDir(args.run_dir)
    cli.inputs_of_the_run(args, run.source())
    ids = read_labels(args.input).ids
    images = cached_images(args.input / "train", ids, cli.cache_dir_of(args))
    for path in plots.write_report(run, ids, images):
        print(path)
    return 0


if __name__ == "__main__":
    cli.run(main)
