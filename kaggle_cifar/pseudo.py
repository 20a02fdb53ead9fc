"""Pseudo-labels: a second round of training adds the test images a first-round run labels confidently.

Fold k of the new run takes its pseudo-labels from fold k of the first run only. That model never
trained on fold k's held-out images, so no held-out label reaches fold k's training, directly or
through its teacher, and the new run's CV accuracy stays an honest estimate. That needs the same
fold split in both runs, which is checked before anything is written."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from kaggle_cifar.augment import TTA_VIEWS
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.device import Policy, to_device
from kaggle_cifar.errors import ConfigError
from kaggle_cifar.folds import FoldData
from kaggle_cifar.inference import load_fold_model, stream_probs
from kaggle_cifar.rundir import RunDir, same_classes

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The first-round run that a second round learns its pseudo-labels from."""
    run: RunDir
    cfg: TrainConfig
    classes: list[str]


def open_teacher(path: Path, folds_csv: str, classes: list[str]) -> Teacher:
    """The first-round run at `path`, once its fold split (folds.csv's text) and classes are found
    equal to this run's."""
    run = RunDir(path)
    if not (run.path / "config.json").is_file():
        raise ConfigError(f"--pseudo-labels {path}: not a training run (no config.json)")
    cfg, teacher_classes = run.read()
    if not run.split_is(folds_csv):
        raise ConfigError(f"--pseudo-labels {path}: its fold split differs from this run's, so its fold k "
                          f"has trained on fold k's held-out images; use a run with the same --folds, --seed, "
                          f"--holdout and training set")
    same_classes([(f"--pseudo-labels {path}", teacher_classes), ("this run", classes)])
    return Teacher(run, cfg, teacher_classes)


def pseudo_labelled(cfg: TrainConfig, teacher: Teacher, fold: int, test_images: np.ndarray,
                    policy: Policy) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images (uint8 NHWC, on the policy's device) that the teacher run's fold `fold`
    labels confidently (see most_confident), and the classes it gives them."""
    model = load_fold_model(teacher.run, teacher.cfg, teacher.classes, fold, policy)
    probs = stream_probs([model], test_images, TTA_VIEWS[teacher.cfg.tta], policy,
                         desc=f"pseudo-labels for fold {fold}")
    confidence, predicted = probs.max(1)
    chosen = most_confident(confidence, predicted, cfg.pseudo_threshold, cfg.pseudo_max, len(teacher.classes))
    if not len(chosen):  # a second round without pseudo-labels would be a plain run under another name
        raise ConfigError(f"--pseudo-labels {teacher.run}: its fold {fold} gives no test image a probability of "
                          f"--pseudo-threshold {cfg.pseudo_threshold} or more (its highest: {confidence.max():.3f}); "
                          f"lower the threshold")
    counts = torch.bincount(predicted[chosen], minlength=len(teacher.classes)).tolist()
    log.info("fold %d: %d of %d test images pseudo-labelled at probability >= %.2f (per class: %s)",
             fold, len(chosen), len(test_images), cfg.pseudo_threshold, counts)
    return to_device(test_images[chosen.cpu().numpy()], policy.device), predicted[chosen]


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


def with_pseudo_labels(data: FoldData, cfg: TrainConfig, teacher: Teacher, test_images: np.ndarray,
                       policy: Policy) -> FoldData:
    """`data` with its fold's pseudo-labelled test images appended to its training set."""
    images, targets = pseudo_labelled(cfg, teacher, data.fold, test_images, policy)
    return dataclasses.replace(data, train_images=torch.cat([data.train_images, images]),
                               train_targets=torch.cat([data.train_targets, targets]))
