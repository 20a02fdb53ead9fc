"""Checkpoints: written atomically, read with `weights_only=True` (a checkpoint never runs code),
and checked against the run they are loaded into."""

from __future__ import annotations

import pickle
import re
import threading
from pathlib import Path

import torch

from kaggle_cifar.atomic import atomic_path, free_space
from kaggle_cifar.errors import CheckpointError, first_line


def save(path: Path, state: dict) -> None:
    """Write `state` atomically: on any failure (a full disk among them) the previous file stays."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (RuntimeError, OSError) as e:  # torch's writer reports a full disk as a RuntimeError
        raise CheckpointError(f"{path}: could not be written ({first_line(e)}); "
                              f"{free_space(path)} on its disk; the previous version, if any, is kept") from None


def on_host(state):
    """A copy of `state` whose tensors are on the CPU and owned by it: what the training changes
    next leaves the copy as it was."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: on_host(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_host(v) for v in state)
    return state


class Background:
    """Checkpoints written by a thread while training goes on, one at a time, each from a host copy
    taken when it is handed over: an epoch of a fast GPU (about 2 s on an H100, not measured)
    would otherwise wait on a 90 MB fsynced write. A write's error is raised by the next `save` or
    by `wait`, which returns when the last checkpoint is on disk."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: CheckpointError | None = None

    def save(self, path: Path, state: dict) -> None:
        self.wait()
        host = on_host(state)
        self.thread = threading.Thread(target=self._write, args=(path, host), name=f"checkpoint {path.name}")
        self.thread.start()

    def _write(self, path: Path, state: dict) -> None:
        try:
            save(path, state)
        except CheckpointError as e:
            self.error = e

    def wait(self, raising: bool = True) -> None:
        """Until the last checkpoint handed over is written; then its error, if `raising`."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None and raising:
            error, self.error = self.error, None
            raise error


def read(path: Path, device: torch.device | str = "cpu"):
    """Load `path` with `weights_only=True`: tensors and plain containers, never pickled code."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        held = f"it holds a {found.group(1)} object, not only tensors" if found else first_line(e)
        raise CheckpointError(f"{path}: refused, not a plain weights file ({held}; loading it could run code): save "
                              f"the weights alone, torch.save(model.state_dict(), PATH)") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({first_line(e)})") from None
    return state


def load(path: Path, expected_meta: dict, device: torch.device | str = "cpu") -> dict:
    """Load `path` safely, refusing any `meta` entry that differs from `expected_meta`."""
    state = read(path, device)
    meta = state.get("meta", {}) if isinstance(state, dict) else {}
    wrong = {k: (meta.get(k), v) for k, v in expected_meta.items() if meta.get(k) != v}
    if wrong:
        listed = "; ".join(f"{k} is {got!r}, this run has {want!r}" for k, (got, want) in wrong.items())
        raise CheckpointError(f"{path}: belongs to another run: {listed}")
    return state
