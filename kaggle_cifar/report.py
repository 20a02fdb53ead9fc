"""The out-of-fold report: CV accuracy, per-fold and per-class accuracy, confusion matrix."""

from __future__ import annotations

import numpy as np


def confusion_matrix(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    return np.bincount(targets * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def oof_summary(probs: np.ndarray, targets: np.ndarray, fold_of: np.ndarray, classes: list[str]) -> dict:
    """Every image is scored by the model of the fold that held it out, never by one that trained on it."""
    preds = probs.argmax(1)
    correct = preds == targets
    confusion = confusion_matrix(targets, preds, len(classes))
    return {
        "cv_accuracy": float(correct.mean()),
        "fold_accuracy": [float(correct[fold_of == k].mean()) for k in range(int(fold_of.max()) + 1)],
        "per_class_accuracy": {c: float(confusion[i, i] / confusion[i].sum()) for i, c in enumerate(classes)},
        "confusion": confusion.tolist(),
        "classes": list(classes),
    }
