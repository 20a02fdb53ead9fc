"""Run first on a new machine: versions, the device, what the installed torch can do on it, and a
short probe of training and predict (compiled graphs, host syncs, images/s, memory), with one
verdict line per check. Exits 1 if a check fails.

    python scripts/doctor.py
    python scripts/doctor.py --input input        # also validate the competition files
"""

import argparse
from pathlib import Path

from kaggle_cifar import cli


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=None, help="competition folder to validate too (default: none)")
    cli.add_cache_flag(parser)
    cli.add_device_flags(parser, compiles=False)
    args = parser.parse_args()
    from kaggle_cifar.doctor import run  # after the flags: --help answers without loading torch

    if args.input is not None:
        cli.resolve_paths(args)
    verdicts = run(args.device, args.input, args.cache_dir, precision=args.precision)
    print("\n".join(str(v) for v in verdicts))
    return 1 if any(v.problem for v in verdicts) else 0


if __name__ == "__main__":
    cli.run(main)
