"""What the scripts share: the input/run-dir flags, logging to stderr, and one clear error line.

It imports no torch: `scripts/prepare.py` (which only unpacks) starts in a blink."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kaggle_cifar.data import default_cache_dir
from kaggle_cifar.errors import EXPECTED_ERRORS
from kaggle_cifar.prepare import prepare

DEFAULT_RUN_DIR = Path("runs/default")


def add_input_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, default=Path("input"),
                        help="competition folder: trainLabels.csv, train/, test/, or the raw download (default: input)")


def add_io_flags(parser: argparse.ArgumentParser, run_dir: Path | None = DEFAULT_RUN_DIR) -> None:
    add_input_flag(parser)
    parser.add_argument("--run-dir", type=Path, default=run_dir,
                        help=f"where checkpoints, OOF predictions and reports go (default: {run_dir or 'a temporary folder'})")
    add_cache_flag(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: this process's GPU if any)")


def add_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where decoded images are cached (default: INPUT/.cache, or ./cache if INPUT is read-only)")


def add_compile_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the training step (default: on for GPUs of compute capability 7.0 and up, "
                             "off on older GPUs and the CPU)")


def resolve_paths(args: argparse.Namespace, ctx=None) -> None:
    """Unpack a raw Kaggle download first if that is all `--input` holds (with a distributed
    context: rank 0 only, the others wait), then point `args.input` at the prepared layout and
    fill in the cache dir."""
    args.input = ctx.main_rank_first(lambda: prepare(args.input)) if ctx else prepare(args.input)  # no-op once done
    args.cache_dir = cache_dir_of(args)


def cache_dir_of(args: argparse.Namespace) -> Path:
    return args.cache_dir or default_cache_dir(args.input)


def run(main) -> None:
    """Run `main()`, turning the project's expected errors into one `error:` line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        sys.exit(main())
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
