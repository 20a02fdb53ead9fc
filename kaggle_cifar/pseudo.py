"""Pseudo-labels: a second round of training adds the test images a first-round run labels confidently.

Fold k of the new run takes its pseudo-labels from fold k of the first run only. That model never
trained on fold k's held-out images, so no held-out label reaches fold k's training, directly or
through its teacher, and the new run's CV accuracy stays an honest estimate. That needs the same
fold split in both runs, which is checked."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from kaggle_cifar.augment import TTA_VIEWS
from kaggle_cifar.config import ConfigError, TrainConfig
from kaggle_cifar.predict import load_fold_model, predict_probs
from kaggle_cifar.train import FoldData

log = logging.getLogger(__name__)


def check_teacher_run(teacher_dir: Path, folds_csv: str, classes: list[str]) -> TrainConfig:
    """The first-round run's config, once its fold split and classes are found equal to this run's."""
    teacher_dir = Path(teacher_dir)
    if not (teacher_dir / "config.json").exists():
        raise ConfigError(f"--pseudo-labels {teacher_dir}: not a training run (no config.json)")
    if (teacher_dir / "folds.csv").read_text() != folds_csv:
        raise ConfigError(f"--pseudo-labels {teacher_dir}: its fold split differs from this run's, so its fold k "
                          f"has trained on fold k's held-out images; use a run with the same --folds, --seed, "
                          f"--holdout and training set")
    if json.loads((teacher_dir / "classes.json").read_text()) != list(classes):
        raise ConfigError(f"--pseudo-labels {teacher_dir}: it was trained on other classes")
    return TrainConfig.from_json(teacher_dir / "config.json")


def pseudo_labelled(teacher_dir: Path, teacher_cfg: TrainConfig, classes: list[str], fold: int,
                    test_images: np.ndarray, threshold: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images (uint8 NHWC, on `device`) that the teacher's fold `fold` gives a probability
    of at least `threshold`, and those predicted classes."""
    teacher = load_fold_model(teacher_dir, teacher_cfg, classes, fold, test_images.shape[1:], device)
    probs = predict_probs([teacher], test_images, TTA_VIEWS[teacher_cfg.tta], device,
                          desc=f"pseudo-labels for fold {fold}")
    confidence, predicted = probs.max(1)
    chosen = (confidence >= threshold).nonzero().squeeze(1)
    counts = torch.bincount(predicted[chosen], minlength=len(classes)).tolist()
    log.info("fold %d: %d of %d test images pseudo-labelled at probability >= %.2f (per class: %s)",
             fold, len(chosen), len(test_images), threshold, counts)
    return torch.from_numpy(np.array(test_images[chosen.cpu().numpy()])).to(device), predicted[chosen]


def with_pseudo_labels(data: FoldData, teacher_dir: Path, teacher_cfg: TrainConfig, classes: list[str],
                       test_images: np.ndarray, threshold: float, device: torch.device) -> FoldData:
    """`data` with its fold's pseudo-labelled test images appended to its training set."""
    images, targets = pseudo_labelled(teacher_dir, teacher_cfg, classes, data.fold, test_images, threshold, device)
    return dataclasses.replace(data, train_images=torch.cat([data.train_images, images]),
                               train_targets=torch.cat([data.train_targets, targets]))
