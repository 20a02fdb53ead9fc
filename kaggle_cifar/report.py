"""The run's report: OOF CV accuracy (a full fit's: its holdout accuracy), per-fold accuracy with
each TTA view set, per-class accuracy, confusion matrix; with a holdout, single-fold against
fold-ensemble accuracy; and its text table."""

from __future__ import annotations

import numpy as np


def accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    return float((probs.argmax(1) == targets).mean())


def nll(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    return float(-np.log(np.maximum(probs[np.arange(len(targets)), targets], 1e-12)).mean())


def confusion_matrix(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    return np.bincount(targets * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def oof_summary(probs: np.ndarray, targets: np.ndarray, scored_by: np.ndarray, classes: list[str],
                full_fit: bool = False) -> dict:
    """Every image is scored by the model of the fold that held it out, never by one that trained on
    it: the CV accuracy. A full fit's one model is scored on the holdout (nothing without one)."""
    summary = {"classes": list(classes)}
    if not len(targets):
        return summary
    confusion = confusion_matrix(targets, probs.argmax(1), len(classes))
    return summary | {
        "holdout_accuracy" if full_fit else "cv_accuracy": accuracy(probs, targets),
        "fold_accuracy": [accuracy(probs[scored_by == k], targets[scored_by == k]) for k in range(int(scored_by.max()) + 1)],
        "per_class_accuracy": {c: float(confusion[i, i] / confusion[i].sum()) for i, c in enumerate(classes)},
        "confusion": confusion.tolist(),
    }


ESTIMATES = {"cv_accuracy": ("CV", "out-of-fold"), "holdout_accuracy": ("holdout", "full fit")}


def headline(summary: dict) -> tuple[str, str, float] | None:
    """The run's accuracy estimate: its short name, what it is, its value. The CV accuracy, or a
    full fit's holdout accuracy; None for a full fit without a holdout."""
    return next(((*ESTIMATES[key], summary[key]) for key in ESTIMATES if key in summary), None)


def view_sets_of_every(per_fold: list[dict]) -> list[str]:
    """The TTA view sets every fold has a figure or prediction for, in the first fold's order (the
    order of augment.TTA_VIEWS): a fold finished by an older version has fewer."""
    return [name for name in per_fold[0] if all(name in fold for fold in per_fold)]


def holdout_summary(fold_probs: list[dict[str, np.ndarray]], targets: np.ndarray) -> dict:
    """Accuracy on images no fold trained on, for each TTA view set: each fold alone, and the fold
    ensemble (probabilities averaged over folds), which is what a submission uses."""
    names = view_sets_of_every(fold_probs)
    return {
        "images": int(len(targets)),
        "single_fold_accuracy": {name: [accuracy(p[name], targets) for p in fold_probs] for name in names},
        "ensemble_accuracy": {name: accuracy(np.mean([p[name] for p in fold_probs], axis=0), targets) for name in names},
    }


def describe(summary: dict, tta: str) -> str:
    """The report as a short text table: the TTA gain per fold, and the ensemble gain on the holdout."""
    by_tta = summary["fold_accuracy_by_tta"]
    names = list(by_tta)
    width = {n: max(8, len(n) + 2) for n in names}  # a column a view set, as wide as its name
    estimate = headline(summary)
    if estimate is None:
        lines = ["no accuracy estimate: a full fit (--folds 1) without --holdout holds no image out"]
    else:
        name, what, value = estimate
        lines = [f"{name} accuracy ({what}, TTA {tta}): {value:.4f}",
                 f"{'held-out accuracy, TTA:':<34}" + "".join(f"{n:>{width[n]}}" for n in names)]
        for fold in range(len(summary["fold_accuracy"])):
            lines.append(f"{f'  fold {fold}':<34}" + "".join(f"{by_tta[n][fold]:>{width[n]}.4f}" for n in names))
    if "time_budget" in summary:
        spent = summary["time_budget"]
        lines.append(f"time budget {spent['budget_s']:.0f} s, used {spent['used_s']:.0f} s "
                     f"(training and its data; not predict); epochs per fold: {spent['epochs_per_fold']}")
    if "holdout" in summary:
        holdout = summary["holdout"]
        single = holdout["single_fold_accuracy"]
        lines.append(f"holdout ({holdout['images']:,} images no fold trained on):")
        lines.append(f"{'  single fold (mean over folds)':<34}" + "".join(f"{np.mean(single[n]):>{width[n]}.4f}" for n in names))
        lines.append(f"{'  fold ensemble':<34}" + "".join(f"{holdout['ensemble_accuracy'][n]:>{width[n]}.4f}" for n in names))
    return "\n".join(lines)
