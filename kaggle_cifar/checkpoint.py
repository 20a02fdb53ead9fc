"""Checkpoints: written atomically, read with `weights_only=True` (a checkpoint never runs code),
and checked against the run they are loaded into."""

from __future__ import annotations

import pickle
import re
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
