"""The test set's prediction: the fold ensemble of one or more finished runs (every fold weighing
the same, or each run recalibrated and weighed as its out-of-fold predictions say) with test-time
views, sharded over torchrun ranks; then the submission CSV. The test cache is streamed to the
device in large chunks with every fold model resident: each chunk crosses the bus once, or with a
TTA gate once a model (inference.gated_probs)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kaggle_cifar import budget, distributed
from kaggle_cifar.augment import TTA_VIEWS
from kaggle_cifar.data import load_test
from kaggle_cifar.device import synchronize
from kaggle_cifar.errors import RunDirError
from kaggle_cifar.inference import blend, for_inference, gated_probs, load_fold_models, stream_probs, with_temperature
from kaggle_cifar.report import accuracy
from kaggle_cifar.rundir import RunDir, same_classes
from kaggle_cifar.submission import render, sha256_of, submission_frame

log = logging.getLogger(__name__)


def blend_weights(probs: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """The weights (non-negative, summing to 1) whose blend of the models' probabilities of the same
    images has the least log loss on `targets`. The loss is convex in the weights, so torch's L-BFGS
    on their softmax parameters finds its minimum."""
    true = torch.tensor(np.stack([p[np.arange(len(targets)), targets] for p in probs]), dtype=torch.float64)
    theta = torch.zeros(len(probs), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = -(theta.softmax(0) @ true).clamp_min(1e-12).log().mean()
        value.backward()
        return value

    optimizer.step(loss)
    return theta.detach().softmax(0).numpy()


def temperature(probs: np.ndarray, targets: np.ndarray) -> float:
    """The temperature whose recalibration of one model's probabilities (inference.with_temperature)
    has the least log loss on `targets`: temperature scaling, fitted by L-BFGS on the log of its
    inverse (the loss is convex in the inverse). Label smoothing and averaged views leave a model
    under-confident by as much as its recipe smooths, and blend_weights, a log loss, would weigh that
    as a worse model: put on one scale first, runs are weighed by what they know."""
    log_probs = torch.tensor(np.log(np.clip(probs, 1e-12, None)), dtype=torch.float64)
    labels = torch.tensor(targets, dtype=torch.long)
    log_inverse = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_inverse], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(log_probs * log_inverse.exp(), labels)
        value.backward()
        return value

    optimizer.step(loss)
    return float((-log_inverse.detach()).exp())


def recalibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    return with_temperature(torch.tensor(probs, dtype=torch.float64), temperature).numpy()


def blended(probs: list[np.ndarray], weights, temperatures: list[float]) -> np.ndarray:
    """inference.blend of host arrays: the runs' probabilities recalibrated and weighted."""
    return blend([torch.tensor(p, dtype=torch.float64) for p in probs], list(weights), temperatures).numpy()


def calibrated_blend(probs: list[np.ndarray], targets: np.ndarray) -> tuple[list[float], np.ndarray]:
    """Each model's temperature (fitted alone) and the blend_weights of their recalibrated
    probabilities: what --weights oof gives the runs."""
    temperatures = [temperature(p, targets) for p in probs]
    return temperatures, blend_weights([recalibrated(p, t) for p, t in zip(probs, temperatures)], targets)


def cross_fitted(probs: list[np.ndarray], targets: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, list]:
    """The blend of each half of the images (`first`, then the rest) under the calibrated_blend
    fitted on the other half alone, and the two fits (temperatures, weights): --weights oof scored on
    images it was not fitted on, as a full fit's OOF weights, fitted on its holdout, cannot be."""
    out, fits = np.empty_like(probs[0]), []
    for half in (first, ~first):
        temperatures, weights = calibrated_blend([p[~half] for p in probs], targets[~half])
        out[half] = blended([p[half] for p in probs], weights, temperatures)
        fits.append((temperatures, weights))
    return out, fits


def oof_probs(runs: list[RunDir], classes: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """Each run's out-of-fold probabilities and their labels' class indices: every run must hold out
    the same images in the same folds, so that they score the same images."""
    for run in runs[1:]:
        if not run.split_is(runs[0].folds_csv()):
            raise RunDirError(f"--weights oof: {run} holds out other images than {runs[0]} (their folds.csv differ): "
                              f"weights fitted on out-of-fold predictions need the same split (the same --folds, "
                              f"--holdout and --split-seed, or --seed); use --weights equal")
    frames = [run.read_oof_csv() for run in runs]
    targets = pd.Categorical(frames[0]["label"], categories=classes).codes
    return [f[[f"p_{c}" for c in classes]].to_numpy() for f in frames], targets


def oof_weights(runs: list[RunDir], classes: list[str]) -> tuple[list[float], np.ndarray, dict[str, float]]:
    """Each run's temperature and weight, fitted on the runs' out-of-fold probabilities (oof_probs,
    calibrated_blend), and the OOF accuracy of each run, of equal weights and of these weights."""
    probs, targets = oof_probs(runs, classes)
    temperatures, weights = calibrated_blend(probs, targets)
    scored = {**{str(run): p for run, p in zip(runs, probs)}, "equal weights": sum(probs) / len(probs),
              "these weights": blended(probs, weights, temperatures)}
    accuracies = {name: accuracy(p, targets) for name, p in scored.items()}
    log.info("ensemble weights fitted on %d out-of-fold predictions: %s; their OOF accuracy: %s", len(targets),
             ", ".join(f"{run} {w:.3f} (temperature {t:.2f})" for run, w, t in zip(runs, weights, temperatures)),
             ", ".join(f"{name} {value:.4f}" for name, value in accuracies.items()))
    return temperatures, weights, accuracies


def weighing(runs: list[RunDir], folds: list[int], classes: list[str], how: str) -> dict:
    """How the runs (of `folds` fold models each) weigh in the ensemble, as the submission's record
    keeps it: each run's weight, its folds sharing it equally, and the temperature each of its fold
    models' probabilities are recalibrated by; `how` equal: every fold model the same, as it
    predicts; oof: oof_weights, with the OOF accuracies."""
    if how == "oof":
        temperatures, weights, accuracies = oof_weights(runs, classes)
        return {"runs": list(map(str, runs)), "weights": list(map(float, weights)), "temperatures": temperatures,
                "by": how, "oof_accuracy": accuracies}
    return {"runs": list(map(str, runs)), "weights": [k / sum(folds) for k in folds],
            "temperatures": [1.0] * len(runs), "by": how}


def ensemble_probs(input_dir: Path, run_dirs: list[Path], cache_dir: Path, ctx: distributed.Context,
                   tta: str | None = None, batch_size: int | None = None, gate: float = 0.0,
                   weights: str = "equal") -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Test ids, class probabilities and classes of the ensemble of every fold of every run in
    `run_dirs` (`weights`: every fold the same, or each run's folds sharing its weight and its
    temperature fitted on the runs' OOF predictions: oof_weights), and its record (runs, weights and
    temperatures, views, gate: what the submission's record keeps); with the `tta` views (default:
    the first run's; with a `gate`, each view only for the images the views before it leave with
    their top two classes under `gate` times the share of views to come apart:
    inference.gated_probs), computed as the context's device policy says (in the precision measured
    faster, where it measures), `batch_size` images a forward pass (default: the smallest of the
    runs' predict_batch); on every rank."""
    resolved = [Path(path).resolve() for path in run_dirs]
    twice = [str(path) for k, path in enumerate(run_dirs) if resolved[k] in resolved[:k]]
    if twice:  # it would weigh twice, and an OOF fit would blend a run with itself
        raise RunDirError(f"{', '.join(twice)}: in the ensemble twice (--run-dir and --ensemble name each run once)")
    runs = [RunDir(path) for path in run_dirs]
    configs = [run.read() for run in runs]
    classes = same_classes([(run, run_classes) for run, (_, run_classes) in zip(runs, configs)])
    record = weighing(runs, [cfg.folds for cfg, _ in configs], classes, weights)
    model_weights = [w / cfg.folds for w, (cfg, _) in zip(record["weights"], configs) for _ in range(cfg.folds)]
    temperatures = [t for t, (cfg, _) in zip(record["temperatures"], configs) for _ in range(cfg.folds)]
    ids, images = ctx.main_rank_first(lambda: load_test(input_dir, cache_dir))
    models = [model for run, (cfg, _) in zip(runs, configs) for model in load_fold_models(run, cfg, classes, ctx.policy)]
    tta = tta or configs[0][0].tta
    views = TTA_VIEWS[tta]
    batch_size = batch_size or min(cfg.predict_batch for cfg, _ in configs)

    rows = distributed.shard(len(images), ctx)
    policy = budget.fastest_for_inference(models, images[rows], ctx.policy)
    n_local, distinct = rows.stop - rows.start, len(set(views))
    models = for_inference(models, policy, n_local * distinct, batch_size)
    desc = "predict (images x views x folds)" if ctx.world_size == 1 else f"predict rank {ctx.rank}"
    t0 = time.perf_counter()
    if gate:
        local, forwards = gated_probs(models, images[rows], views, gate, policy, batch_size, desc, model_weights,
                                      temperatures)
        log.info("%sgated TTA: each next of the %d views only for the images whose top two classes are "
                 "still under %g x the share of views to come apart (log-probability): %.2f views an image, "
                 "%.2fx fewer than every view",
                 ctx.speaker, distinct, gate, forwards / max(n_local, 1), n_local * distinct / max(forwards, 1))
    else:
        local = stream_probs(models, images[rows], views, policy, batch_size, desc, weights=model_weights,
                             temperatures=temperatures)
        forwards = n_local * distinct
    synchronize(ctx.device)
    seconds = time.perf_counter() - t0
    log.info("%s%d images, %.2g views an image on average, x %d fold%s in %.1fs (%.0f images/s per view "
             "and fold)", ctx.speaker, n_local, forwards / max(n_local, 1), len(models), "" if len(models) == 1 else "s",
             seconds, forwards * len(models) / seconds)
    record.update(tta=tta, tta_gate=gate)
    return ids, distributed.gather_rows(local, len(images), ctx).cpu().numpy(), classes, record


def submission_csv(input_dir: Path, run_dirs: list[Path], cache_dir: Path, ctx: distributed.Context,
                   tta: str | None = None, batch_size: int | None = None, gate: float = 0.0,
                   weights: str = "equal") -> tuple[str, dict] | None:
    """The ensemble's submission CSV, validated, and its record (ensemble_probs); on rank 0, None elsewhere."""
    ids, probs, classes, record = ensemble_probs(input_dir, run_dirs, cache_dir, ctx, tta, batch_size, gate, weights)
    if not ctx.is_main:
        return None
    csv = render(submission_frame(ids, probs, classes), ids, classes)
    return csv, {**record, "csv_sha256": sha256_of(csv.encode())}
