"""Stratified k-fold split, optionally with a stratified holdout that no fold trains on."""

from __future__ import annotations

import numpy as np

HOLDOUT = -1  # the fold index of images kept out of every fold


def stratified_folds(targets: np.ndarray, folds: int, seed: int, holdout: int = 0) -> np.ndarray:
    """Fold index (0..folds-1) of each sample, or HOLDOUT for `holdout` samples no fold uses.

    Within each class the samples are shuffled; the holdout takes the front of every class in
    proportion to its size, and the rest are dealt round-robin, the dealing continuing from class
    to class, so fold sizes differ by at most one overall and per class."""
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(np.flatnonzero(targets == c)) for c in np.unique(targets)]
    assignment = np.empty(len(targets), dtype=np.int64)
    if holdout:
        position = np.empty(len(targets))
        for members in shuffled:
            position[members] = (np.arange(len(members)) + 0.5) / len(members)
        held = np.zeros(len(targets), dtype=bool)
        held[np.argsort(position, kind="stable")[:holdout]] = True
        assignment[held] = HOLDOUT
        shuffled = [members[~held[members]] for members in shuffled]
    offset = 0
    for members in shuffled:
        assignment[members] = (offset + np.arange(len(members))) % folds
        offset += len(members)
    return assignment
