"""The fold split (stratified k-fold, optionally with a stratified holdout that no fold trains on),
and what one fold trains on: its images on the device, with the classes and the normalisation.

One fold (`--folds 1`) is a full fit: one model on every image but the holdout, which is then its
held-out set (a competitor's final model when the budget has no room for K of them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kaggle_cifar.config import TrainConfig
from kaggle_cifar.data import Labels, TrainSet
from kaggle_cifar.device import to_device
from kaggle_cifar.errors import ConfigError

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


def fold_split(cfg: TrainConfig, labels: Labels) -> np.ndarray:
    """The run's fold of every training image (HOLDOUT for the holdout), refused if the holdout
    leaves a fold without some class."""
    fold_of = stratified_folds(labels.targets, cfg.folds, cfg.fold_seed, cfg.holdout)
    for fold in range(cfg.folds):
        missing = [c for i, c in enumerate(labels.classes) if not (labels.targets[fold_of == fold] == i).any()]
        if missing:
            raise ConfigError(f"--holdout {cfg.holdout} leaves fold {fold} without images of {', '.join(missing)}; "
                              f"use a smaller --holdout")
    return fold_of


@dataclass(frozen=True)
class FoldData:
    """One fold's images (uint8 NHWC, on the training device) and what a model of it needs to know.
    The holdout images (empty without --holdout) are in no fold's training or validation set."""
    fold: int
    classes: list[str]
    mean: torch.Tensor  # per-channel pixel mean and std of the whole training set: the input normalisation
    std: torch.Tensor
    train_images: torch.Tensor
    train_targets: torch.Tensor
    val_images: torch.Tensor
    val_targets: torch.Tensor
    holdout_images: torch.Tensor


@dataclass(frozen=True)
class DeviceTrainSet:
    """The whole training set, moved to the device once; every fold is a selection of it."""
    images: torch.Tensor
    targets: torch.Tensor
    classes: list[str]
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, train: TrainSet, device: torch.device) -> "DeviceTrainSet":
        images = to_device(train.images, device)
        pixels = images.reshape(-1, images.shape[-1]).float()
        return cls(images, torch.from_numpy(train.labels.targets).to(device), train.labels.classes,
                   pixels.mean(0), pixels.std(0))

    def fold(self, fold_of: np.ndarray, fold: int) -> FoldData:
        """Fold `fold` trains on every image but those it is scored on (`held_out_by`) and the holdout."""
        def rows(mask: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(mask).to(self.images.device)

        scored = held_out_by(fold_of, fold)
        trained, held_out = rows(trained_by(fold_of, fold)), rows(scored)
        holdout = rows((fold_of == HOLDOUT) & ~scored)
        return FoldData(fold, self.classes, self.mean, self.std, self.images[trained], self.targets[trained],
                        self.images[held_out], self.targets[held_out], self.images[holdout])


def trained_by(fold_of: np.ndarray, fold: int) -> np.ndarray:
    """Which images fold `fold` trains on: all but those it is scored on and the holdout."""
    return ~held_out_by(fold_of, fold) & (fold_of != HOLDOUT)


def held_out_by(fold_of: np.ndarray, fold: int) -> np.ndarray:
    """Which images fold `fold` is validated and scored on (its OOF predictions): its own fold's, or
    in a one-fold run (a full fit) the holdout, if there is one."""
    return fold_of == (HOLDOUT if fold_of.max() <= 0 else fold)
