"""Stratified k-fold split: every fold gets each class in proportion, deterministically per seed."""

from __future__ import annotations

import numpy as np


def stratified_folds(targets: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index (0..folds-1) of each sample.

    Within each class the samples are shuffled and dealt round-robin; the dealing continues from
    class to class, so fold sizes differ by at most one overall and per class."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(targets), dtype=np.int64)
    offset = 0
    for c in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == c))
        assignment[members] = (offset + np.arange(len(members))) % folds
        offset += len(members)
    return assignment
