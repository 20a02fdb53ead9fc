"""Redraw a run's report pictures (RUN_DIR/report/*.png) from its files; needs matplotlib.

    python scripts/report.py runs/default
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kaggle_cifar import cli, plots  # noqa: E402
from kaggle_cifar.data import cached_images, default_cache_dir, read_labels  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--input", type=Path, default=Path("input"), help="competition folder (default: input)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="decoded-image cache (default: as train_folds)")
    args = parser.parse_args()
    if not plots.available():
        print("error: the report pictures need matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    ids = read_labels(args.input).ids
    images = cached_images(args.input / "train", ids, args.cache_dir or default_cache_dir(args.input))
    for path in plots.write_report(args.run_dir, ids, images):
        print(path)
    return 0


if __name__ == "__main__":
    cli.run(main)
