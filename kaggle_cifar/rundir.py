"""A run directory: every path and file of a run and of its folds is named, read and written here.

    RUN_DIR/config.json    the resolved TrainConfig: the run's identity (another config is refused)
            classes.json   class names, in the order of the model's outputs
            folds.csv      id,fold of every training image (folds.HOLDOUT for the holdout)
            input.json     the input folder and image cache the run was trained from, for the
                           scripts that read a finished run (predict, report, submit)
            fold<k>/       see FoldDir
            oof.csv        id, fold, label, prediction, per-class probabilities (holdout excluded)
            report.json    CV accuracy, per-fold and per-class accuracy, confusion matrix, holdout
            report/*.png   the report's pictures

    SEARCH_DIR/study.db          the Optuna study (SQLite; or a database named by --storage)
               trials/<params>/  one run dir per trial, named by its parameters (fold 0 trained)
               trials.csv        every trial: number, state, parameters, accuracy, epochs run, seconds
               report/*.png      the search's pictures
               best_config.json  the best trial's config, for train_folds.py --config
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_cifar import checkpoint
from kaggle_cifar.atomic import atomic_path, write_text
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.errors import CheckpointError, ConfigError, RunDirError, first_line

log = logging.getLogger(__name__)

UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, UnicodeDecodeError, pd.errors.ParserError,
              pd.errors.EmptyDataError)


def _read(path: Path, read, rebuild: str):
    """`read(path)`, or one RunDirError naming the file, what is wrong with it and `rebuild`: how to
    write it again."""
    try:
        return read(path)
    except FileNotFoundError:
        raise RunDirError(f"{path}: missing; {rebuild}") from None
    except UNREADABLE as e:
        raise RunDirError(f"{path}: unreadable ({first_line(e, typed=True)}); {rebuild}") from None


def _json(path: Path):
    return json.loads(path.read_text())


@dataclass(frozen=True)
class FoldDir:
    """RUN_DIR/fold<k>/:
      last.pt      everything needed to resume (weights, EMA, optimizer, schedule, scaler, epoch, log)
      log.csv      one row per epoch: train/val loss and accuracy, learning rate, time, images/s
      tensorboard/ the same metrics for TensorBoard, when it is installed
      model.pt     final weights (the EMA's when enabled) with the run meta predict checks
      oof.npy      class probabilities (with the run's TTA) of the fold's held-out images
      holdout.npz  with --holdout: class probabilities of the holdout images, one array per TTA view set
      result.json  written last: the fold is finished (and skipped on a re-run)
    """
    path: Path
    fold: int

    @property
    def redo_finish(self) -> str:
        """How to write a finished fold's files again: from its last checkpoint, without training."""
        return (f"delete {self.path / 'result.json'} and run train_folds.py on this run dir again "
                f"(--config {self.path.parent / 'config.json'}): fold {self.fold}'s final files are made again "
                f"from its last checkpoint")

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def model(self) -> Path:
        return self.path / "model.pt"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    def finished(self) -> bool:
        return (self.path / "result.json").exists()

    def started(self) -> bool:
        return self.finished() or self.last.exists()

    def read_result(self) -> dict:
        return _read(self.path / "result.json", _json, self.redo_finish)

    def write_result(self, result: dict) -> None:
        write_text(self.path / "result.json", json.dumps(result, indent=2) + "\n")

    def save_last(self, state: dict, background: checkpoint.Background | None = None) -> None:
        """last.pt, atomically; with `background`, written by its thread from a host copy."""
        if background is not None:
            background.save(self.last, state)
        else:
            checkpoint.save(self.last, state)

    def load_last(self, meta: dict, device) -> dict:
        try:
            return checkpoint.load(self.last, meta, device)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; delete it to train fold {self.fold} again from its first epoch "
                                  f"(finished folds are kept)") from None

    def save_model(self, meta: dict, weights: dict) -> None:
        checkpoint.save(self.model, {"meta": meta, "model": weights})

    def load_model(self, meta: dict, device="cpu") -> dict:
        """The final weights; an unfinished fold is an error, never a silently smaller ensemble."""
        if not self.model.exists():
            raise CheckpointError(f"{self.model}: missing; fold {self.fold} has not finished (run train_folds.py)")
        return checkpoint.load(self.model, meta, device)["model"]

    def write_log(self, history: list[dict]) -> None:
        write_text(self.path / "log.csv", pd.DataFrame(history).to_csv(index=False))

    def read_log(self) -> pd.DataFrame:
        return _read(self.path / "log.csv", pd.read_csv, self.redo_finish)

    def seconds_spent(self) -> float:
        """Training time this fold has logged so far (its epochs and their checkpoints)."""
        if not (self.path / "log.csv").exists():
            return 0.0
        log_rows = self.read_log()
        return float(log_rows["seconds"].sum() + log_rows.get("checkpoint_seconds", pd.Series(dtype=float)).sum())

    def write_oof(self, probs: np.ndarray) -> None:
        with atomic_path(self.path / "oof.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, probs)

    def read_oof(self) -> np.ndarray:
        return _read(self.path / "oof.npy", np.load, self.redo_finish)

    def write_holdout(self, probs_by_tta: dict[str, np.ndarray]) -> None:
        with atomic_path(self.path / "holdout.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **probs_by_tta)

    def read_holdout(self) -> dict[str, np.ndarray]:
        return _read(self.path / "holdout.npz", lambda path: dict(np.load(path)), self.redo_finish)


def run_meta(cfg: TrainConfig, classes: list[str]) -> dict:
    """What a checkpoint must agree on with the run (a TrainConfig and its classes) that loads it."""
    return {"arch": cfg.arch, "width": cfg.width, "classes": list(classes)}


def config_change(path: Path, cfg: TrainConfig) -> str | None:
    """How `cfg` differs from the config saved at `path`, field by field (`epochs: 4 -> 6`, and the
    flags that give the saved values back), or None if it is the same run. Compared as values,
    so a config.json written before a field was added still matches."""
    try:
        saved = TrainConfig.from_json(path)
    except ConfigError as e:
        return f"its config is unreadable ({e})"
    changed = [f.name for f in dataclasses.fields(TrainConfig) if getattr(saved, f.name) != getattr(cfg, f.name)]
    if not changed:
        return None

    def flag(name: str) -> str:
        value, option = getattr(saved, name), "--" + name.replace("_", "-")
        if isinstance(value, bool):
            return option if value else "--no-" + name.replace("_", "-")
        return f"{option} {value}" if value != "" else f"{option} ''"

    differences = ", ".join(f"{name}: {getattr(saved, name)!r} -> {getattr(cfg, name)!r}" for name in changed)
    return f"{differences}; use another --run-dir, or this run's own {' '.join(flag(n) for n in changed)}"


def folds_table(ids: np.ndarray, fold_of: np.ndarray) -> str:
    """folds.csv's text: the fold of every training id."""
    return pd.DataFrame({"id": ids, "fold": fold_of}).to_csv(index=False)


class RunDir:
    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def fold(self, k: int) -> FoldDir:
        return FoldDir(self.path / f"fold{k}", k)

    def folds(self, cfg: TrainConfig) -> list[FoldDir]:
        return [self.fold(k) for k in range(cfg.folds)]

    @property
    def report_json(self) -> Path:
        return self.path / "report.json"

    @property
    def report_pictures(self) -> Path:
        return self.path / "report"

    def started(self) -> bool:
        """Has any fold written a checkpoint? Until then the run dir holds no work to protect."""
        return any(self.path.glob("fold*/last.pt")) or any(self.path.glob("fold*/result.json"))

    def create(self, cfg: TrainConfig, classes: list[str], folds_csv: str, source: dict | None = None) -> None:
        """Record the run's identity; refuse a run dir that holds another run's work, naming what
        differs. One whose folds never started (a typo stopped it) takes the new identity.
        `source` (input and cache_dir) records where the images came from: not identity, the
        latest is kept."""
        self._refuse_a_file()
        self.path.mkdir(parents=True, exist_ok=True)
        started = self.started()
        for name, content, what in [("config.json", cfg.to_json(), "config"),
                                    ("classes.json", json.dumps(classes) + "\n", "set of classes"),
                                    ("folds.csv", folds_csv, "training set or fold split")]:
            path = self.path / name
            if not path.exists() or path.read_text() == content:
                change = None if path.exists() else "new"
            elif name == "config.json":
                change = config_change(path, cfg)
            else:
                change = f"use another --run-dir, or delete {self.path} to start over"
            if change is None:
                continue
            if change != "new" and started:
                raise RunDirError(f"{path}: this run dir was made with a different {what}: {change}")
            if change != "new":
                log.info("%s: replaced (no fold of this run dir had started)", path)
            write_text(path, content)
        if source is not None:
            write_text(self.path / "input.json", json.dumps({k: str(Path(v).resolve()) for k, v in source.items()}) + "\n")

    def saved_config(self) -> TrainConfig | None:
        """The config this run dir was made with, if it has a readable one."""
        try:
            return TrainConfig.from_json(self.path / "config.json") if (self.path / "config.json").is_file() else None
        except ConfigError:
            return None

    def source(self) -> dict[str, Path]:
        """The input folder and cache the run was trained from (empty for a run made before they
        were recorded)."""
        self.require()
        path = self.path / "input.json"
        if not path.is_file():
            return {}
        try:
            return {k: Path(v) for k, v in json.loads(path.read_text()).items()}
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
            raise RunDirError(f"{path}: unreadable ({first_line(e, typed=True)}); train_folds.py writes it again, "
                              f"or give --input") from None

    def _refuse_a_file(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path}: is a file, not a run dir; give --run-dir a folder")

    def require(self) -> None:
        """Refuse, naming what is wrong, a path that holds no training run."""
        self._refuse_a_file()
        if not self.path.exists():
            raise RunDirError(f"{self.path}: no such run dir (train_folds.py --run-dir {self.path} trains one)")
        for name in ("config.json", "classes.json"):
            if not (self.path / name).is_file():
                raise RunDirError(f"{self.path / name}: missing; {self.path} is not a training run "
                                  f"(run train_folds.py)")

    def read(self) -> tuple[TrainConfig, list[str]]:
        """The run's config and classes."""
        self.require()
        try:
            classes = json.loads((self.path / "classes.json").read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{self.path / 'classes.json'}: unreadable ({first_line(e)})") from None
        return TrainConfig.from_json(self.path / "config.json"), classes

    def folds_csv(self) -> str:
        return (self.path / "folds.csv").read_text()

    def split_is(self, folds_csv: str) -> bool:
        """Was this run trained on the same images in the same folds (folds.csv's text)?"""
        return self.folds_csv() == folds_csv

    def read_folds(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "folds.csv")

    def write_oof_csv(self, frame: pd.DataFrame) -> None:
        write_text(self.path / "oof.csv", frame.to_csv(index=False, float_format="%.6f"))

    def read_oof_csv(self) -> pd.DataFrame:
        return _read(self.path / "oof.csv", lambda path: pd.read_csv(path, dtype={"label": str, "prediction": str}),
                     self.redo_report)

    def write_report(self, summary: dict) -> None:
        write_text(self.report_json, json.dumps(summary, indent=2) + "\n")

    def read_report(self) -> dict:
        return _read(self.report_json, _json, self.redo_report)

    @property
    def redo_report(self) -> str:
        return (f"run train_folds.py on this run dir again (--config {self.path / 'config.json'}): the report is "
                f"written again from the finished folds, without training")

    @contextlib.contextmanager
    def writer(self, wait: bool = False):
        """This process is the run dir's one writer while the block runs: a second training of it is
        refused, naming the holder (with `wait`, it waits for the holder to end). The lock is the
        kernel's (flock), so a process that dies releases it; readers (predict, report) take none."""
        self._refuse_a_file()
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "writer.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                raise RunDirError(f"{self.path}: {holder} is training this run dir; wait for it to end, or use another "
                                  f"--run-dir") from None
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            lock.flush()
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class SearchDir:
    """A hyperparameter search's files (see the module's docstring)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @property
    def study_url(self) -> str:
        return f"sqlite:///{self.path.resolve() / 'study.db'}"

    def trial(self, params: dict) -> RunDir:
        """The run dir of a trial with these parameters: the same parameters, the same run dir, so a
        trial that was stopped and is asked for again resumes where it was."""
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]  # the exact values
        return RunDir(self.path / "trials" / f"{shown(params).replace(', ', '_')}-{digest}")

    @property
    def pictures(self) -> Path:
        return self.path / "report"

    def write_trials_csv(self, frame: pd.DataFrame) -> None:
        write_text(self.path / "trials.csv", frame.to_csv(index=False))

    @property
    def best_config(self) -> Path:
        return self.path / "best_config.json"

    def write_best_config(self, cfg: TrainConfig) -> None:
        write_text(self.best_config, cfg.to_json())


def shown(params: dict) -> str:
    """Parameters as a person reads them: `lr=0.0123, optimizer=sgd` (4 significant digits)."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def same_classes(runs: list[tuple[RunDir | str, list[str]]]) -> list[str]:
    """The classes every run (a run dir, or a name for one) was trained on; runs of different
    competitions cannot be combined."""
    first, classes = runs[0]
    for run, other in runs[1:]:
        if other != classes:
            raise RunDirError(f"{run}: trained on the classes {other}, {first} on {classes}; "
                              f"runs of different competitions cannot be combined")
    return classes
