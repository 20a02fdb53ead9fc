"""Unpack the raw Kaggle download (cifar-10.zip, or train.7z/test.7z) into the competition layout.

    kaggle competitions download -c cifar-10 -p input && python scripts/prepare.py --input input
    python scripts/prepare.py --input /kaggle/input/cifar-10 --dest input     # read-only Kaggle notebook input
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kaggle_cifar import cli  # noqa: E402
from kaggle_cifar.prepare import prepare  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=Path("input"), help="folder with the download (default: input)")
    parser.add_argument("--dest", type=Path, default=None,
                        help="where to unpack (default: INPUT, or ./input if INPUT is read-only)")
    args = parser.parse_args()
    print(prepare(args.input, args.dest))
    return 0


if __name__ == "__main__":
    cli.run(main)
