"""Unpack the raw Kaggle download (cifar-10.zip, or train.7z/test.7z) into the competition layout.

    kaggle competitions download -c cifar-10 -p input && python scripts/prepare.py --input input
    python scripts/prepare.py --input /kaggle/input/cifar-10 --dest input     # read-only Kaggle notebook input
"""

import argparse
from pathlib import Path

from kaggle_cifar import cli
from kaggle_cifar.prepare import prepare


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_input_flag(parser)
    parser.add_argument("--dest", type=Path, default=None,
                        help="where to unpack (default: INPUT, or ./input if INPUT is read-only)")
    args = parser.parse_args()
    print(prepare(args.input, args.dest))
    return 0


if __name__ == "__main__":
    cli.run(main)
