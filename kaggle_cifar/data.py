"""Read and validate the competition files, and decode the PNGs once into a uint8 `.npy` cache.

Layout (as Kaggle ships it): `trainLabels.csv` (id,label), `train/<id>.png`, `test/<id>.png`.
Every check raises `InputError` with one line naming the file and the problem, before any
training starts. Images are decoded by all CPU cores straight into a memory-mapped temporary
`.npy` that is renamed into place when complete; a manifest beside it records the source
folder's fingerprint, so a cache that no longer matches its PNGs is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from kaggle_cifar.atomic import atomic_path, free_space, write_text
from kaggle_cifar.errors import InputError, first_line

log = logging.getLogger(__name__)

LABELS_FILE = "trainLabels.csv"
MAX_LISTED = 10  # ids named in one error line before "and N more"
RARE_CLASS_SHARE = 0.1  # a class with fewer images than this share of the median class is warned about


@dataclass(frozen=True)
class Labels:
    ids: np.ndarray       # int64, ascending
    targets: np.ndarray   # int64 class index per id
    classes: list[str]    # sorted class names; the index is the model's output index


def listing(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def read_labels(input_dir: Path) -> Labels:
    path = Path(input_dir) / LABELS_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing (the competition's id,label file; run scripts/prepare.py on the Kaggle download)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable CSV ({first_line(e)})") from None
    if list(frame.columns) != ["id", "label"]:
        raise InputError(f"{path}: header is {list(frame.columns)}, expected ['id', 'label']")
    if frame.empty:
        raise InputError(f"{path}: no rows")
    ids = pd.to_numeric(frame["id"], errors="coerce")
    bad = frame["id"][ids.isna() | (ids % 1 != 0)].tolist()
    if bad:
        raise InputError(f"{path}: ids that are not whole numbers: {listing(bad)}")
    ids = ids.astype(np.int64)
    dup = sorted(set(ids[ids.duplicated()]))
    if dup:
        raise InputError(f"{path}: duplicate ids: {listing(dup)}")
    labels = frame["label"].str.strip()
    empty = ids[labels == ""].tolist()
    if empty:
        raise InputError(f"{path}: empty labels for ids {listing(empty)}")
    order = np.argsort(ids.to_numpy(), kind="stable")
    classes = sorted(labels.unique())
    targets = labels.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    return Labels(ids=ids.to_numpy()[order], targets=targets[order], classes=classes)


def check_class_counts(labels: Labels, folds: int, path: Path) -> None:
    """Every class needs an image in every fold. Most classes short of that means too many folds;
    one or two means typo'd labels, as does a class far smaller than the rest (warned: it would
    train as a class of its own)."""
    counts = np.bincount(labels.targets, minlength=len(labels.classes))
    short = np.flatnonzero(counts < folds)
    if len(short) > len(counts) / 2:
        raise InputError(f"--folds {folds}: {len(short)} of the {len(counts)} classes in {path} have fewer images than "
                         f"that (the smallest has {counts.min()}); use --folds {max(2, counts.min())} or fewer")

    def named(c: int) -> str:
        return f"'{labels.classes[c]}' ({counts[c]} image(s): ids {listing(labels.ids[labels.targets == c].tolist())})"

    if len(short):
        raise InputError(f"{path}: labels with fewer images than the {folds} folds, not a real class? "
                         f"{'; '.join(named(c) for c in short)}")
    tiny = np.flatnonzero(counts < RARE_CLASS_SHARE * np.median(counts))
    if len(tiny):
        log.warning("warning: %s: %s against %d for the median class: a typo in the labels? Each trains as a class of "
                    "its own", path, "; ".join(named(c) for c in tiny), np.median(counts))


def image_ids(folder: Path) -> np.ndarray:
    """Ids of `folder/<id>.png`, ascending in numeric order (10 before 100)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: missing image folder (run scripts/prepare.py on the Kaggle download)")
    names = [e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]
    # What an operating system or a tool leaves beside the images (Thumbs.db, desktop.ini, notes) is
    # no image of the competition's; an image under another name may be one, and is refused.
    image_suffixes = Image.registered_extensions()
    others = [n for n in names if not n.endswith(".png") and os.path.splitext(n)[1].lower() not in image_suffixes]
    if others:
        log.warning("warning: %s: left out %d file(s) that are not images: %s", folder, len(others),
                    listing(sorted(others)))
        names = sorted(set(names) - set(others))
    if not names:
        raise InputError(f"{folder}: empty image folder")
    bad = sorted(n for n in names if not (n.endswith(".png") and n[:-4].isdigit()))
    if bad:
        raise InputError(f"{folder}: images not named <id>.png: {listing(bad)}")
    return np.sort(np.array([int(n[:-4]) for n in names], dtype=np.int64))


def check_train_ids(labels: Labels, file_ids: np.ndarray, input_dir: Path) -> None:
    unlabeled = np.setdiff1d(file_ids, labels.ids).tolist()
    if unlabeled:
        raise InputError(f"{Path(input_dir) / LABELS_FILE}: no label for train images {listing(unlabeled)}")
    missing = np.setdiff1d(labels.ids, file_ids).tolist()
    if missing:
        raise InputError(f"{Path(input_dir) / 'train'}: missing images for labelled ids {listing(missing)}")


def check_test_ids(file_ids: np.ndarray, folder: Path) -> None:
    """Kaggle scores a submission by id 1..N; a gap means a half-extracted archive."""
    expected = np.arange(1, len(file_ids) + 1)
    if not np.array_equal(file_ids, expected):
        missing = np.setdiff1d(np.arange(1, file_ids.max() + 1), file_ids).tolist()
        raise InputError(f"{folder}: ids are not 1..{len(file_ids)}; missing {listing(missing)}")


# ---------------------------------------------------------------------------------------------
# Decoding and the cache


def _fingerprint(folder: Path, ids: np.ndarray) -> dict:
    """Identity of the source PNGs from one stat per file: a digest of every file's name, size,
    inode, mtime and ctime. Swapping two files (new inodes under the names), replacing one with
    another of the same size, or restoring one with an old mtime each change it: the kernel sets a
    file's ctime on every change of its content or metadata, and nothing can set it back. A copy
    of the folder elsewhere also changes it, and is decoded again."""
    digest = hashlib.blake2b(digest_size=16)
    for name, st in sorted((e.name, e.stat()) for e in os.scandir(folder) if e.name.endswith(".png")):
        digest.update(f"{name} {st.st_size} {st.st_ino} {st.st_mtime_ns} {st.st_ctime_ns}\n".encode())
    return {"folder": str(Path(folder).resolve()), "count": int(len(ids)), "ids_sum": int(ids.sum()),
            "files": digest.hexdigest()}


def _decode(path: Path) -> np.ndarray:
    """One PNG as (H, W, C) uint8, its channels as stored (a grayscale PNG gives C=1)."""
    with Image.open(path, formats=["PNG"]) as image:
        array = np.asarray(image)
    return array if array.ndim == 3 else array[:, :, None]


def _describe(image: np.ndarray) -> str:
    h, w, c = image.shape
    return f"{w}x{h} with {c} channel(s)"


def _decode_chunk(task: tuple) -> list[tuple[int, str]]:
    """Worker: decode PNGs into rows [start, start+len) of the memory-mapped cache; return problems."""
    npy_path, folder, ids, start = task
    out = np.lib.format.open_memmap(npy_path, mode="r+")
    chunk = np.zeros((len(ids), *out.shape[1:]), dtype=np.uint8)  # one write to the map per chunk: 2x faster
    problems = []
    for row, i in enumerate(ids):
        try:
            image = _decode(Path(folder) / f"{i}.png")
        except (OSError, SyntaxError, ValueError) as e:
            problems.append((int(i), f"not a readable PNG ({first_line(e, limit=80)})"))
            continue
        if image.shape != chunk.shape[1:]:
            problems.append((int(i), f"{_describe(image)}, expected {_describe(chunk[0])} RGB"))
            continue
        chunk[row] = image
    out[start:start + len(ids)] = chunk
    out.flush()
    return problems


def _workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_folder(folder: Path, ids: np.ndarray, npy_path: Path, chunk: int = 2000) -> None:
    """Decode `folder/<id>.png` for `ids` into `npy_path` (N, H, W, 3) uint8, using every core."""
    folder = Path(folder)
    try:
        first = _decode(folder / f"{ids[0]}.png")
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{folder / f'{ids[0]}.png'}: not a readable PNG ({first_line(e)})") from None
    if first.ndim != 3 or first.shape[2] != 3:
        raise InputError(f"{folder / f'{ids[0]}.png'}: {_describe(first)}, expected an RGB image")
    np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.uint8, shape=(len(ids), *first.shape)).flush()
    _reserve(npy_path)
    tasks = [(str(npy_path), str(folder), ids[s:s + chunk], s) for s in range(0, len(ids), chunk)]
    workers = min(_workers(), len(tasks))
    problems: list[tuple[int, str]] = []
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    try:  # Ctrl-C reaches the workers too: they ignore it, and this process stops them without waiting
        with tqdm(total=len(ids), desc=f"decode {folder.name}", unit="img", unit_scale=True) as bar:
            for task, found in zip(tasks, pool.map(_decode_chunk, tasks)):
                problems += found
                bar.update(len(task[2]))
    except BaseException as e:
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(e, BrokenProcessPool):
            raise InputError(f"{folder}: decoding stopped, a worker process died ({first_line(e)}); the cache goes to "
                             f"{npy_path.parent}: {free_space(npy_path.parent)}") from None
        raise
    pool.shutdown()
    seconds = time.perf_counter() - t0
    if problems:
        problems.sort()
        listed = "; ".join(f"{i}.png: {p}" for i, p in problems[:MAX_LISTED])
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise InputError(f"{folder}: {len(problems)} bad image(s): {listed}{more}")
    log.info("decoded %d images from %s in %.1fs (%.0f images/s, %d process%s)",
             len(ids), folder, seconds, len(ids) / seconds, workers, "" if workers == 1 else "es")


def _reserve(path: Path) -> None:
    """Allocate the whole file now: on a full disk that fails here, with a message, instead of
    killing the workers that write into the memory map later (SIGBUS)."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            raise InputError(f"{path.parent}: no room for the decoded images ({size / 2**20:,.0f} MiB needed, "
                             f"{free_space(path.parent)}: {e.strerror}); free space or give --cache-dir on another "
                             f"disk") from None


def cached_images(folder: Path, ids: np.ndarray, cache_dir: Path) -> np.ndarray:
    """The images of `folder` for `ids`, as a read-only memory-mapped (N, H, W, 3) uint8 array.

    Decoded once; later calls reuse the cache while the folder's fingerprint still matches."""
    folder, cache_dir = Path(folder), Path(cache_dir)
    npy_path, manifest_path = cache_dir / f"{folder.name}.npy", cache_dir / f"{folder.name}.json"
    fingerprint = _fingerprint(folder, ids)
    if npy_path.is_file() and manifest_path.is_file():
        try:
            if json.loads(manifest_path.read_text()) == fingerprint:
                images = np.load(npy_path, mmap_mode="r")
                if len(images) == len(ids):
                    return images
        except (ValueError, OSError):
            pass  # unreadable manifest or cache: rebuild it below
        log.info("cache %s does not match %s: rebuilding", npy_path, folder)
    manifest_path.unlink(missing_ok=True)  # the manifest goes first, so a half-replaced pair never matches
    with atomic_path(npy_path) as tmp:
        decode_folder(folder, ids, tmp)
    write_text(manifest_path, json.dumps(fingerprint) + "\n")
    return np.load(npy_path, mmap_mode="r")


def default_cache_dir(input_dir: Path) -> Path:
    """`INPUT/.cache`, or `./cache` when the input is read-only (Kaggle's /kaggle/input)."""
    input_dir = Path(input_dir)
    return input_dir / ".cache" if os.access(input_dir, os.W_OK) else Path("cache")


@dataclass(frozen=True)
class TrainSet:
    labels: Labels
    images: np.ndarray  # (N, H, W, 3) uint8, row i is labels.ids[i]


def load_train(input_dir: Path, cache_dir: Path, folds: int) -> TrainSet:
    input_dir = Path(input_dir)
    labels = read_labels(input_dir)
    check_class_counts(labels, folds, input_dir / LABELS_FILE)
    check_train_ids(labels, image_ids(input_dir / "train"), input_dir)
    return TrainSet(labels, cached_images(input_dir / "train", labels.ids, cache_dir))


def test_ids(input_dir: Path) -> np.ndarray:
    folder = Path(input_dir) / "test"
    ids = image_ids(folder)
    check_test_ids(ids, folder)
    return ids


def load_test(input_dir: Path, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    ids = test_ids(input_dir)
    return ids, cached_images(Path(input_dir) / "test", ids, cache_dir)
