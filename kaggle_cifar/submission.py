"""Write and validate Kaggle submissions (`id,label`, class names, ids 1..N in numeric order).

    python -m kaggle_cifar.submission check submissions/sub.csv --input input
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_cifar import cli
from kaggle_cifar.data import listing, read_labels, test_ids
from kaggle_cifar.errors import SubmissionError, first_line


def submission_frame(ids: np.ndarray, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "label": np.asarray(classes)[probs.argmax(1)]})


def validate(frame: pd.DataFrame, expected_ids: np.ndarray, classes: list[str], source: str) -> None:
    if list(frame.columns) != ["id", "label"]:
        raise SubmissionError(f"{source}: header is {list(frame.columns)}, expected ['id', 'label']")
    empty = np.flatnonzero(frame["label"].astype(str).str.strip() == "")
    if len(empty):
        raise SubmissionError(f"{source}: empty label on row(s) {listing((empty + 2).tolist())} (row 1 is the header)")
    if len(frame) != len(expected_ids):
        raise SubmissionError(f"{source}: {len(frame)} rows, expected one per test image ({len(expected_ids)})")
    written = frame["id"].astype(str)
    not_whole = np.flatnonzero(~written.str.fullmatch(r"\d+"))
    if len(not_whole):  # Kaggle matches ids as written: "1.0" is not test image 1
        rows = [f"row {r + 2} has id {frame['id'].iloc[r]!r}" for r in not_whole[:3]]
        raise SubmissionError(f"{source}: ids must be whole numbers as written (1, 2, ...): {'; '.join(rows)}")
    ids = written.astype(np.int64).to_numpy()
    wrong = np.flatnonzero(ids != expected_ids)
    if len(wrong):
        rows = [f"row {r + 2} has id {frame['id'].iloc[r]}, expected {expected_ids[r]}" for r in wrong[:3]]
        raise SubmissionError(f"{source}: ids are not 1..{len(expected_ids)} in order: {'; '.join(rows)}")
    unknown = sorted(set(frame["label"].astype(str)) - set(classes))
    if unknown:
        raise SubmissionError(f"{source}: labels that are not classes: {listing(unknown)} (classes: {', '.join(classes)})")


def _read(source) -> pd.DataFrame:
    return pd.read_csv(source, dtype=str, keep_default_na=False)


def render(frame: pd.DataFrame, expected_ids: np.ndarray, classes: list[str]) -> str:
    """The CSV text of `frame`, checked by parsing that very text back: what is validated is what
    gets written."""
    text = frame.to_csv(index=False)
    validate(_read(io.StringIO(text)), expected_ids, classes, "the submission about to be written")
    return text


RECORD_KEYS = {"runs", "weights", "by", "tta", "tta_gate", "csv_sha256"}


def record_path(csv: Path) -> Path:
    """Where a submission file's record (the runs and weights, views and gate that made it, and the
    file's hash) is kept."""
    return csv.with_name(csv.name + ".json")


def sha256_of(contents: bytes) -> str:
    """The hash a record keeps of its submission's contents."""
    return hashlib.sha256(contents).hexdigest()


def check_file(path: Path, input_dir: Path) -> pd.DataFrame:
    """Validate a submission file against the competition input it is meant for."""
    try:
        frame = _read(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{path}: not a readable CSV ({first_line(e)})") from None
    validate(frame, test_ids(input_dir), read_labels(input_dir).classes, str(path))
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m kaggle_cifar.submission",
                                description="Validate a submission CSV before uploading it.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate FILE against the competition input")
    check.add_argument("file", type=Path)
    cli.add_input_flag(check)
    args = parser.parse_args(argv)
    frame = check_file(args.file, args.input)
    print(f"{args.file}: valid submission, {len(frame)} rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main)
