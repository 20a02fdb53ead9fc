"""Cross-validation runs: the run dir, the fold split, the folds (split across torchrun ranks), the
OOF report; and the test-set prediction of the fold ensemble of one or more finished runs.

Run dir contents: config.json (the run's identity), classes.json, folds.csv (id,fold),
fold<k>/ (see train.py), oof.csv (id, fold, label, prediction, per-class probabilities; holdout images
excluded), report.json (CV accuracy, per-fold accuracy with each TTA view set, per-class accuracy,
confusion matrix; with --holdout, single-fold and ensemble accuracy on the holdout).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kaggle_cifar import distributed, plots
from kaggle_cifar.atomic import write_text
from kaggle_cifar.augment import TTA_VIEWS
from kaggle_cifar.config import ConfigError, TrainConfig
from kaggle_cifar.data import Labels, TrainSet, load_test, load_train
from kaggle_cifar.folds import HOLDOUT, stratified_folds
from kaggle_cifar.predict import load_fold_models, predict_test
from kaggle_cifar.pseudo import check_teacher_run, with_pseudo_labels
from kaggle_cifar.report import holdout_summary, oof_summary
from kaggle_cifar.submission import render, submission_frame
from kaggle_cifar.train import FoldData, fold_finished, train_fold

log = logging.getLogger(__name__)


class RunDirError(Exception):
    """The run dir belongs to another configuration or dataset."""


def _check_or_write(path: Path, content: str, what: str) -> None:
    if path.exists():
        if path.read_text() != content:
            raise RunDirError(f"{path}: this run dir was made with a different {what}; "
                              f"use another --run-dir, or delete it to start over")
    else:
        write_text(path, content)


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, classes: list[str], ids: np.ndarray, fold_of: np.ndarray) -> None:
    """Record the run's identity, or refuse a run dir that holds another run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_or_write(run_dir / "config.json", cfg.to_json(), "config")
    _check_or_write(run_dir / "classes.json", json.dumps(classes) + "\n", "set of classes")
    _check_or_write(run_dir / "folds.csv", folds_table(ids, fold_of), "training set or fold split")


def folds_table(ids: np.ndarray, fold_of: np.ndarray) -> str:
    """folds.csv: the fold of every training id (HOLDOUT for the holdout)."""
    return pd.DataFrame({"id": ids, "fold": fold_of}).to_csv(index=False)


def read_run(run_dir: Path) -> tuple[TrainConfig, list[str]]:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise RunDirError(f"{path}: missing; {run_dir} is not a finished training run (run train_folds.py)")
    return TrainConfig.from_json(path), json.loads((Path(run_dir) / "classes.json").read_text())


def check_input(input_dir: Path, cache_dir: Path, folds: int) -> str:
    """Validate every competition file (decoding each image, which also builds the cache)."""
    train = load_train(input_dir, cache_dir, folds)
    ids, _ = load_test(input_dir, cache_dir)
    return (f"input OK: {len(train.labels.ids)} training images in {len(train.labels.classes)} classes "
            f"({', '.join(train.labels.classes)}), {len(ids)} test images, {train.images.shape[1:]} uint8 each")


def train_folds(cfg: TrainConfig, input_dir: Path, run_dir: Path, cache_dir: Path, ctx: distributed.Context,
                compile: bool = False) -> dict | None:
    """Train every fold this rank owns (fold k on rank k mod N); rank 0 returns the OOF report."""
    train = distributed.main_rank_first(ctx, lambda: load_train(input_dir, cache_dir, cfg.folds))
    labels = train.labels
    fold_of = fold_split(cfg, labels)
    if ctx.is_main:
        prepare_run_dir(run_dir, cfg, labels.classes, labels.ids, fold_of)
    distributed.barrier(ctx)

    if cfg.pseudo_labels:
        teacher_cfg = check_teacher_run(Path(cfg.pseudo_labels), folds_table(labels.ids, fold_of), labels.classes)
        _, test_images = distributed.main_rank_first(ctx, lambda: load_test(input_dir, cache_dir))
    images, targets, mean, std = on_device(train, ctx.device)
    for fold in range(ctx.rank, cfg.folds, ctx.world_size):
        fold_dir = run_dir / f"fold{fold}"
        data = fold_data(images, targets, fold_of, fold)
        if cfg.pseudo_labels and not fold_finished(fold_dir):
            data = with_pseudo_labels(data, cfg, teacher_cfg, labels.classes, test_images, ctx.device)
        train_fold(cfg, data, labels.classes, mean, std, fold_dir, ctx.device, compile)
    distributed.barrier(ctx)
    if not ctx.is_main:
        return None
    summary = write_oof_report(run_dir, cfg, labels.ids, labels.targets, labels.classes, fold_of)
    if plots.available():
        plots.write_report(run_dir, labels.ids, train.images)
    return summary


def fold_split(cfg: TrainConfig, labels: Labels) -> np.ndarray:
    """The fold of every training image (HOLDOUT for the holdout), refused if the holdout leaves a
    fold without some class."""
    fold_of = stratified_folds(labels.targets, cfg.folds, cfg.seed, cfg.holdout)
    for fold in range(cfg.folds):
        missing = [c for i, c in enumerate(labels.classes) if not (labels.targets[fold_of == fold] == i).any()]
        if missing:
            raise ConfigError(f"--holdout {cfg.holdout} leaves fold {fold} without images of {', '.join(missing)}; "
                              f"use a smaller --holdout")
    return fold_of


def on_device(train: TrainSet, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole training set moved to the device once (uint8 images, targets), and its per-channel
    pixel mean and std for the model's input normalisation."""
    images = torch.from_numpy(np.array(train.images)).to(device)
    targets = torch.from_numpy(train.labels.targets).to(device)
    pixels = images.reshape(-1, images.shape[-1]).float()
    return images, targets, pixels.mean(0), pixels.std(0)


def fold_data(images: torch.Tensor, targets: torch.Tensor, fold_of: np.ndarray, fold: int) -> FoldData:
    """Fold `fold` holds its images out: they are its validation set and never in its training set;
    the holdout images are in neither."""
    held_out = torch.from_numpy(fold_of == fold).to(images.device)
    trained = torch.from_numpy((fold_of != fold) & (fold_of != HOLDOUT)).to(images.device)
    holdout = torch.from_numpy(fold_of == HOLDOUT).to(images.device)
    return FoldData(fold, images[trained], targets[trained], images[held_out], targets[held_out], images[holdout])


def write_oof_report(run_dir: Path, cfg: TrainConfig, ids: np.ndarray, targets: np.ndarray, classes: list[str],
                     fold_of: np.ndarray) -> dict:
    results = [json.loads((run_dir / f"fold{fold}" / "result.json").read_text()) for fold in range(cfg.folds)]
    in_folds = fold_of != HOLDOUT
    probs = np.zeros((in_folds.sum(), len(classes)), dtype=np.float32)
    for fold in range(cfg.folds):
        probs[fold_of[in_folds] == fold] = np.load(run_dir / f"fold{fold}" / "oof.npy")
    summary = oof_summary(probs, targets[in_folds], fold_of[in_folds], classes)
    summary["fold_accuracy_by_tta"] = {name: [r["accuracy_by_tta"][name] for r in results] for name in TTA_VIEWS}
    if not in_folds.all():
        per_fold = [dict(np.load(run_dir / f"fold{fold}" / "holdout.npz")) for fold in range(cfg.folds)]
        summary["holdout"] = holdout_summary(per_fold, targets[~in_folds])
    oof = pd.DataFrame({"id": ids[in_folds], "fold": fold_of[in_folds], "label": np.asarray(classes)[targets[in_folds]],
                        "prediction": np.asarray(classes)[probs.argmax(1)]})
    oof = pd.concat([oof, pd.DataFrame(probs, columns=[f"p_{c}" for c in classes])], axis=1)
    write_text(run_dir / "oof.csv", oof.to_csv(index=False, float_format="%.6f"))
    write_text(run_dir / "report.json", json.dumps(summary, indent=2) + "\n")
    return summary


def ensemble_probs(input_dir: Path, run_dirs: list[Path], cache_dir: Path, ctx: distributed.Context,
                   tta: str | None = None, batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Test ids, class probabilities and classes of the ensemble of every fold of every run in
    `run_dirs` (each fold weighs the same), with the `tta` views (default: the first run's)."""
    runs = [read_run(run_dir) for run_dir in run_dirs]
    classes = runs[0][1]
    for run_dir, (_, other) in zip(run_dirs[1:], runs[1:]):
        if other != classes:
            raise RunDirError(f"{run_dir}: trained on the classes {other}, {run_dirs[0]} on {classes}; "
                              f"runs of different competitions cannot be ensembled")
    ids, images = distributed.main_rank_first(ctx, lambda: load_test(input_dir, cache_dir))
    models = [model for run_dir, (cfg, _) in zip(run_dirs, runs)
              for model in load_fold_models(run_dir, cfg, classes, images.shape[1:], ctx.device)]
    return ids, predict_test(images, models, tta or runs[0][0].tta, ctx, batch_size), classes


def predict_runs(input_dir: Path, run_dirs: list[Path], cache_dir: Path, ctx: distributed.Context,
                 tta: str | None = None, batch_size: int = 2048) -> str | None:
    """The ensemble's submission CSV for the test set, validated (on rank 0; None elsewhere)."""
    ids, probs, classes = ensemble_probs(input_dir, run_dirs, cache_dir, ctx, tta, batch_size)
    if not ctx.is_main:
        return None
    return render(submission_frame(ids, probs, classes), ids, classes)
