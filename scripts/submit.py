"""Validate a submission, then upload it with the Kaggle CLI, with a message built from the run.

    python scripts/submit.py submissions/sub.csv --run-dir runs/default
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from kaggle_cifar import cli
from kaggle_cifar.errors import SubmissionError, ToolError
from kaggle_cifar.report import headline
from kaggle_cifar.submission import RECORD_KEYS, check_file, record_path, sha256_of

COMPETITION = "cifar-10"
# Where a token goes, for the Kaggle CLI 2.x and the 1.x before it: said the same way in every hint.
TOKEN = ("create a token on https://www.kaggle.com/settings/api and save it as ~/.kaggle/access_token (chmod 600) or "
         "in the KAGGLE_API_TOKEN variable; Kaggle CLIs before 2.0 read ~/.kaggle/kaggle.json (or KAGGLE_USERNAME and "
         "KAGGLE_KEY) instead.")
HINTS = [  # (text in the Kaggle CLI's output, what it means in plain words)
    ("403", f"Kaggle answered 403 Forbidden: accept the competition rules first, on "
            f"https://www.kaggle.com/c/{COMPETITION}/rules, with the account whose token you use."),
    ("401", f"Kaggle answered 401 Unauthorized: the API token is wrong or expired; {TOKEN}"),
]
NO_CREDENTIALS = f"No Kaggle credentials found: {TOKEN}"
# What the CLI says without credentials: 1.x names kaggle.json; 2.x asks to authenticate and points
# at access_token.
HINTS += [(needle, NO_CREDENTIALS) for needle in ("kaggle.json", "access_token", "must authenticate",
                                                   "Authentication required", "KAGGLE_API_TOKEN")]


def message_for(run, record: dict | None = None) -> str:
    """The run's model, length, views and estimate; with the submission's record (predict.py
    --output), its views and gate, and the runs it blended with their weights."""
    cfg, _ = run.read()
    tta = f"tta {record['tta']}" + (f" gate {record['tta_gate']:g}" if record["tta_gate"] else "") if record else \
        f"tta {cfg.tta}"
    parts = [f"full fit {cfg.arch} w{cfg.width}" if cfg.full_fit else f"{cfg.folds}-fold {cfg.arch} w{cfg.width}",
             f"{cfg.epochs} ep", tta]
    estimate = headline(run.read_report()) if run.report_json.exists() else None
    if estimate is not None:
        parts.append(f"{estimate[0]} {estimate[2]:.4f}")
    if record and len(record["runs"]) > 1:
        parts.append(f"ensemble of {len(record['runs'])} runs, {record['by']} weights "
                     + "/".join(f"{w:.2f}" for w in record["weights"]))
    return ", ".join(parts)


def read_record(csv: Path) -> dict | None:
    """The submission's record beside it (predict.py --output writes it); None without one, or with
    one written for other contents of the file (a later submission written over it by other means)."""
    path = record_path(csv)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not RECORD_KEYS <= set(record):
            raise ValueError(f"it lacks {', '.join(sorted(RECORD_KEYS - set(record or {})))}")
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise SubmissionError(f"{path}: not the record predict.py writes ({e}); write it again with predict.py "
                              f"--output {csv}, or give the message with -m") from None
    if record["csv_sha256"] != sha256_of(csv.read_bytes()):
        print(f"note: {path} records another {csv.name} (written over since): the message describes --run-dir only",
              file=sys.stderr)
        return None
    return record


def explain(output: str) -> str:
    return next((hint for needle, hint in HINTS if needle in output), output.strip().splitlines()[-1] if output.strip() else "")


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, help="the submission CSV")
    cli.add_input_flag(parser, of_the_run=True)
    parser.add_argument("--run-dir", type=Path, default=cli.DEFAULT_RUN_DIR,
                        help=f"run the submission came from (default: {cli.DEFAULT_RUN_DIR})")
    parser.add_argument("-m", "--message", default=None, help="submission message (default: built from the run's config and CV)")
    parser.add_argument("--timeout", type=cli.positive_int, default=600,
                        help="seconds to wait for the Kaggle CLI's upload (default: 600)")
    args = parser.parse_args()
    if not args.file.is_file():  # a mistyped name is named before anything else is asked of the user
        parser.error(f"{args.file}: {'a folder' if args.file.is_dir() else 'no such file'}, not a submission CSV")
    if shutil.which("kaggle") is None:  # before the validation, which reads every test file name
        raise ToolError("the Kaggle CLI is not installed: pip install kaggle (or pip install -e '.[extras]')")
    from kaggle_cifar.rundir import RunDir  # after the flags: --help answers without loading torch

    run = RunDir(args.run_dir)
    cli.inputs_of_the_run(args, run)
    check_file(args.file, args.input)
    message = args.message or message_for(run, read_record(args.file))
    print(f"uploading {args.file} with the Kaggle CLI (waiting up to {args.timeout} s) ...", file=sys.stderr)
    try:
        proc = subprocess.run(["kaggle", "competitions", "submit", "-c", COMPETITION, "-f", str(args.file), "-m", message],
                              capture_output=True, text=True, timeout=args.timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ToolError(f"the Kaggle CLI did not finish in {args.timeout} s (no network, or it waits for input); "
                        f"check `kaggle competitions submissions -c {COMPETITION}` before submitting again, "
                        f"or give --timeout more") from None
    if proc.returncode != 0:
        raise ToolError(f"kaggle submit failed: {explain(proc.stdout + proc.stderr)}")
    print(proc.stdout.strip(), file=sys.stderr)
    print(f"submitted {args.file}: {message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main)
