"""What the scripts share: the input/run-dir flags, logging to stderr, and one clear line for
every error a user can cause, an interruption included.

It imports no torch: `scripts/prepare.py` (which only unpacks) starts at once."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import select
import shlex
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from kaggle_cifar.atomic import free_space
from kaggle_cifar.config import PRECISIONS, parse_duration
from kaggle_cifar.data import default_cache_dir
from kaggle_cifar.errors import EXPECTED_ERRORS, ConfigError
from kaggle_cifar.prepare import prepare

DEFAULT_RUN_DIR = Path("runs/default")
DEFAULT_INPUT = Path("input")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one `error:` line (exit 2) like every other error."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _checked(parse, ok, what: str):
    """An argparse type: `parse(text)` where it parses and `ok` holds, else one message saying what
    the flag takes ("'-1' is not a whole number of at least 1")."""
    def check(text: str):
        try:
            value = parse(text)
            if ok(value):
                return value
        except (ValueError, ConfigError):
            pass
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return check


positive_int = _checked(int, lambda n: n >= 1, "a whole number of at least 1")
non_negative = _checked(float, lambda x: 0 <= x < math.inf, "a finite number of at least 0")
duration = _checked(parse_duration, lambda s: 0 < s < math.inf, "a duration above 0, such as 900, 15m or 1h30m")


def add_input_flag(parser: argparse.ArgumentParser, of_the_run: bool = False) -> None:
    """--input; for a script that reads a finished run (`of_the_run`), its default is the folder the
    run was trained from (`inputs_of_the_run`)."""
    default = "the one --run-dir was trained from, else input" if of_the_run else DEFAULT_INPUT
    parser.add_argument("--input", type=Path, default=None if of_the_run else DEFAULT_INPUT,
                        help=f"competition folder: trainLabels.csv, train/, test/, or the raw download (default: {default})")


def inputs_of_the_run(args: argparse.Namespace, run) -> None:
    """Without --input, the input folder (and, without --cache-dir, the image cache) `run` (a
    RunDir) was trained from; `input` for a run that did not record them."""
    if args.input is None:
        source = run.source()
        args.input = source.get("input", DEFAULT_INPUT)
        if vars(args).get("cache_dir", False) is None and "cache_dir" in source:
            args.cache_dir = source["cache_dir"]


def add_io_flags(parser: argparse.ArgumentParser, run_dir: Path | None = DEFAULT_RUN_DIR,
                 of_the_run: bool = False) -> None:
    add_input_flag(parser, of_the_run)
    parser.add_argument("--run-dir", type=Path, default=run_dir,
                        help=f"where checkpoints, OOF predictions and reports go (default: {run_dir or 'a temporary folder'})")
    add_cache_flag(parser)


def run_dir_flag(run_dir: Path) -> str:
    """` --run-dir RUN_DIR` for a next-step command, quoted for a shell, or nothing for the default
    run dir."""
    return "" if Path(run_dir) == DEFAULT_RUN_DIR else f" --run-dir {shlex.quote(str(run_dir))}"


def add_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where decoded images are cached (default: INPUT/.cache, or ./cache if INPUT is read-only)")


def add_device_flags(parser: argparse.ArgumentParser, compiles: bool = True) -> None:
    """--device and --precision, and where the script runs a model (`compiles`), --compile: the
    flags device.Policy is made from (distributed.setup)."""
    group = parser.add_argument_group("device (how this process computes: one line at start says it)")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: this process's GPU if any)")
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto: bf16 autocast where the device computes bf16 natively (Ampere and later GPUs), "
                            "fp16 with loss scaling on older GPUs; on a CPU with AVX-512 BF16 or AMX, bf16 or "
                            "float32, whichever trains faster as measured before training and again when the "
                            "speed changes; bf16: bf16 autocast; float32: none, Muon's orthogonalisation "
                            "included (default: auto)")
    if compiles:
        group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                           help="torch.compile every model this script runs, for training and for predictions "
                                "(default: the training step on GPUs of compute capability 7.0 and up; on a CPU, "
                                "the predictions of large image sets such as the test set, where the compilation "
                                "pays for itself)")


def resolve_paths(args: argparse.Namespace, ctx=None) -> None:
    """Unpack a raw Kaggle download first if that is all `--input` holds (with a distributed
    context: rank 0 only, the others wait), then point `args.input` at the prepared layout and
    fill in the cache dir."""
    args.input = ctx.main_rank_first(lambda: prepare(args.input)) if ctx else prepare(args.input)  # no-op once done
    args.cache_dir = cache_dir_of(args)


def cache_dir_of(args: argparse.Namespace) -> Path:
    return args.cache_dir or default_cache_dir(args.input)


def describe_os_error(e: OSError) -> str:
    """An OSError as one line naming its file; a full disk says so, with the space left."""
    where = e.filename2 or e.filename or ""  # a rename's target, else the file
    text = f"{where}: {e.strerror or e}" if where else str(e)
    if e.errno == errno.ENOSPC and where:
        text += f" (the disk is full: {free_space(where)})"
    return text


def _stdout_closed() -> bool:
    """Has the reader of standard output gone (`predict.py | head`)? Then nothing more can be said
    there, and the interpreter's last flush is pointed at /dev/null instead of failing again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
        return False
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poll.poll(0)):  # a pipe whose reader closed
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return True


def run(main, interrupted: str = "nothing was written") -> None:
    """Run `main()`; the project's expected errors and the environment's (a full disk, a folder
    where a file should be) become one `error:` line and exit code 2, Ctrl-C one line saying what
    was kept (`interrupted`) and exit code 130; a reader of standard output that has gone, nothing
    and exit code 141."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        with logging_redirect_tqdm():  # log lines go above a progress bar, never into it
            code = main()
    except EXPECTED_ERRORS as e:  # a quoted parser message may span lines: the error is one line
        print("error:", " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        code = 2
    except OSError as e:
        if isinstance(e, BrokenPipeError) and _stdout_closed():
            code = 128 + 13  # as a shell's tools end when their reader has gone (SIGPIPE): in silence
        else:
            print(f"error: {describe_os_error(e)}", file=sys.stderr)
            code = 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        code = 130
    sys.exit(code)
