"""From the raw Kaggle download to the competition layout.

`kaggle competitions download -c cifar-10 -p input` gives `input/cifar-10.zip` holding `train.7z`,
`test.7z`, `trainLabels.csv` and `sampleSubmission.csv`; Kaggle's notebooks mount the same four files,
unzipped, read-only under /kaggle/input/cifar-10. `prepare` unpacks whichever is there into
`train/` and `test/` beside the CSVs (into a writable folder when the input is read-only) and is a
no-op once done. Each archive is extracted under a temporary name and renamed into place, so an
interrupted extraction is redone, never mistaken for a finished one.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path

from tqdm import tqdm

from kaggle_cifar.data import LABELS_FILE
from kaggle_cifar.errors import InputError, first_line

log = logging.getLogger(__name__)

ZIP_NAME = "cifar-10.zip"
CSV_FILES = (LABELS_FILE, "sampleSubmission.csv")


def is_prepared(folder: Path) -> bool:
    return (folder / LABELS_FILE).is_file() and (folder / "train").is_dir() and (folder / "test").is_dir()


def _extract_7z(archive: Path, dest: Path, part: str) -> None:
    try:  # optional: only the raw download needs it
        import py7zr
        from py7zr.callbacks import ExtractCallback
    except ImportError:
        raise InputError(f"{archive}: unpacking it needs py7zr: pip install py7zr "
                         f"(or pip install -e '.[extras]')") from None

    class Progress(ExtractCallback):
        """Counts finished files on the tqdm bar."""

        def report_start_preparation(self): pass
        def report_start(self, processing_file_path, processing_bytes): pass
        def report_update(self, decompressed_bytes): pass
        def report_postprocess(self): pass
        def report_warning(self, message): log.warning("py7zr: %s", message)

        def report_end(self, processing_file_path, wrote_bytes):
            bar.update(1)

    tmp = dest / f".{part}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with py7zr.SevenZipFile(archive) as z:
            with tqdm(total=len(z.getnames()), desc=f"extract {archive.name}", unit="file", unit_scale=True) as bar:
                z.extractall(tmp, callback=Progress())
    except (py7zr.exceptions.Bad7zFile, OSError, EOFError) as e:
        raise InputError(f"{archive}: not a readable 7z archive ({first_line(e)}); download it again") from None
    inner = tmp / part if (tmp / part).is_dir() else tmp
    if not any(inner.glob("*.png")):
        raise InputError(f"{archive}: holds no {part}/<id>.png images")
    os.replace(inner, dest / part)
    shutil.rmtree(tmp, ignore_errors=True)


def prepare(input_dir: Path, dest: Path | None = None) -> Path:
    """Make sure the competition layout exists; return the folder that holds it. `input_dir` is
    the competition's folder, or the download (a zip) itself, which is unpacked beside it."""
    input_dir = Path(input_dir)
    zip_path = input_dir / ZIP_NAME
    if input_dir.is_file() and zipfile.is_zipfile(input_dir):
        input_dir, zip_path = input_dir.parent, input_dir
    elif input_dir.is_file():
        raise InputError(f"{input_dir}: a file; give the competition's folder (trainLabels.csv, train/, test/) or "
                         f"its download ({ZIP_NAME}, or the folder holding it)")
    elif not input_dir.is_dir():  # before anything is made for it, as a writable copy of a read-only input
        raise InputError(f"{input_dir}: no such folder (download the competition with: kaggle competitions "
                         f"download -c cifar-10 -p {input_dir})")
    if is_prepared(input_dir):
        return input_dir
    if dest is None:  # Kaggle notebooks mount the input read-only
        dest = input_dir if os.access(input_dir, os.W_OK) else Path("input")
    dest = Path(dest)
    if is_prepared(dest):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    source, unzipped = input_dir, False
    if not (input_dir / "train.7z").is_file() and zip_path.is_file():
        log.info("unzipping %s", zip_path)
        try:
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(dest, members=[n for n in z.namelist() if n in ("train.7z", "test.7z", *CSV_FILES)])
        except zipfile.BadZipFile as e:
            raise InputError(f"{zip_path}: not a readable zip ({first_line(e)}); download it again") from None
        source, unzipped = dest, True  # these .7z copies are ours: removed once extracted
    for part in ("train", "test"):
        if (dest / part).is_dir():
            continue
        archive = source / f"{part}.7z"
        if not archive.is_file():
            images = next(input_dir.glob("*.png"), None) is not None  # e.g. --input input/train
            raise InputError(f"{input_dir}: no {part}/ folder, {part}.7z or {ZIP_NAME} " + (
                f"(it holds images itself: the competition's folder is the one above it, {input_dir.parent})"
                if images else f"(download with: kaggle competitions download -c cifar-10 -p {input_dir})"))
        _extract_7z(archive, dest, part)
    for name in CSV_FILES:
        if not (dest / name).is_file() and (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    if unzipped:  # never the user's own archives
        for part in ("train", "test"):
            (dest / f"{part}.7z").unlink(missing_ok=True)
    log.info("prepared %s", dest)
    return dest
