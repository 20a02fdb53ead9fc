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


def pseudo_labelled(cfg: TrainConfig, teacher_cfg: TrainConfig, classes: list[str], fold: int,
                    test_images: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images (uint8 NHWC, on `device`) that the teacher run's fold `fold` labels
    confidently (see most_confident), and the classes it gives them."""
    teacher = load_fold_model(Path(cfg.pseudo_labels), teacher_cfg, classes, fold, test_images.shape[1:], device)
    probs = predict_probs([teacher], test_images, TTA_VIEWS[teacher_cfg.tta], device,
                          desc=f"pseudo-labels for fold {fold}")
    confidence, predicted = probs.max(1)
    chosen = most_confident(confidence, predicted, cfg.pseudo_threshold, cfg.pseudo_max, len(classes))
    counts = torch.bincount(predicted[chosen], minlength=len(classes)).tolist()
    log.info("fold %d: %d of %d test images pseudo-labelled at probability >= %.2f (per class: %s)",
             fold, len(chosen), len(test_images), cfg.pseudo_threshold, counts)
    return torch.from_numpy(np.array(test_images[chosen.cpu().numpy()])).to(device), predicted[chosen]


def most_confident(confidence: torch.Tensor, predicted: torch.Tensor, threshold: float, limit: int,
                   num_classes: int) -> torch.Tensor:
    """Indices (ascending) of the predictions with confidence >= threshold; with a limit, only the
    limit // num_classes most confident of each predicted class, so that a class the teacher likes
    (or the decoys resemble) cannot crowd out the others."""
    passed = confidence >= threshold
    if limit:
        kept = torch.zeros_like(passed)
        for c in range(num_classes):
            candidates = (passed & (predicted == c)).nonzero().squeeze(1)
            kept[candidates[confidence[candidates].argsort(descending=True)[:limit // num_classes]]] = True
        passed = kept
    return passed.nonzero().squeeze(1)


def with_pseudo_labels(data: FoldData, cfg: TrainConfig, teacher_cfg: TrainConfig, classes: list[str],
                       test_images: np.ndarray, device: torch.device) -> FoldData:
    """`data` with its fold's pseudo-labelled test images appended to its training set."""
    images, targets = pseudo_labelled(cfg, teacher_cfg, classes, data.fold, test_images, device)
    return dataclasses.replace(data, train_images=torch.cat([data.train_images, images]),
                               train_targets=torch.cat([data.train_targets, targets]))
