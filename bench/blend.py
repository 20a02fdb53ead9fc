"""An ensemble of finished runs scored on their shared holdout: each run alone (its fold ensemble),
every run weighing the same, and the temperatures and weights `predict.py --weights oof` fits on
their out-of-fold predictions (predict.oof_weights). The runs must share their fold split and
holdout (the same --folds, --holdout and --split-seed, or --seed), as --weights oof requires. A full
fit (--folds 1) holds out only the holdout: its out-of-fold predictions are the holdout's, so OOF
weights of full fits are fitted on the images they are scored on, and the table says so; its last
row is the measurement they lack: each half of the holdout (stratified) blended by the temperatures
and weights fitted on the other half alone (predict.cross_fitted).

    python bench/blend.py runs/fast-2fold runs/resnet18-2fold
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import Table, holdout_of  # bench/common.py, beside this script; first, before torch loads
import numpy as np

from kaggle_cifar import cli
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.folds import stratified_folds
from kaggle_cifar.predict import blended, calibrated_blend, cross_fitted, oof_probs
from kaggle_cifar.report import accuracy
from kaggle_cifar.rundir import RunDir, same_classes


def holdout_probs(run: RunDir, cfg: TrainConfig, tta: str | None) -> np.ndarray:
    """The fold ensemble of `run` (trained with `cfg`) on its holdout images under `tta` (default:
    the run's own views)."""
    folds = run.folds(cfg)
    return sum(fold.read_holdout()[tta or cfg.tta] for fold in folds) / len(folds)


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished runs trained with the same --folds, --holdout "
                                                            "and --split-seed (or --seed)")
    parser.add_argument("--tta", default=None, help="the views scored (default: each run's own)")
    args = parser.parse_args()
    runs = [RunDir(path) for path in args.runs]
    saved = [run.read() for run in runs]  # each run's config and classes
    classes = same_classes([(run, run_classes) for run, (_, run_classes) in zip(runs, saved)])
    oof, oof_targets = oof_probs(runs, classes)  # refuses runs whose splits differ
    temperatures, weights = calibrated_blend(oof, oof_targets)  # what predict.py --weights oof gives them
    holdout, labels = holdout_of(runs[0])  # the others' is the same: oof_probs checked
    targets = labels.targets[holdout]
    probs = [holdout_probs(run, cfg, args.tta) for run, (cfg, _) in zip(runs, saved)]
    table = Table()
    for run, weight, t, p, q in zip(runs, weights, temperatures, probs, oof):
        table.add(ensemble=str(run.path), oof_weight=f"{weight:.3f}", temperature=f"{t:.2f}",
                  oof_accuracy=f"{accuracy(q, oof_targets):.4f}", holdout_accuracy=f"{accuracy(p, targets):.4f}")
    for name, w, ts in (("equal weights", np.full(len(runs), 1 / len(runs)), [1.0] * len(runs)),
                        ("OOF weights", weights, temperatures)):
        table.add(ensemble=name, oof_weight=" / ".join(f"{x:.3f}" for x in w),
                  temperature=" / ".join(f"{t:.2f}" for t in ts),
                  oof_accuracy=f"{accuracy(blended(oof, w, ts), oof_targets):.4f}",
                  holdout_accuracy=f"{accuracy(blended(probs, w, ts), targets):.4f}")
    halves, fits = cross_fitted(probs, targets, stratified_folds(targets, 2, seed=0) == 0)
    table.add(ensemble="OOF weights, cross-fitted on holdout halves",
              oof_weight="; ".join(" / ".join(f"{x:.3f}" for x in w) for _, w in fits),
              temperature="; ".join(" / ".join(f"{t:.2f}" for t in ts) for ts, _ in fits),
              oof_accuracy="-", holdout_accuracy=f"{accuracy(halves, targets):.4f}")
    print(f"\n{len(runs)} runs, {len(oof_targets):,} out-of-fold and {len(targets):,} holdout images\n")
    print(table)
    if all(cfg.folds == 1 for cfg, _ in saved):
        print("\nfull fits: the out-of-fold images are the holdout, so the OOF weights were fitted on the images "
              "they are scored on; their holdout accuracy is not a measurement, equal weights' and the cross-fitted "
              "row's are")
    return 0


if __name__ == "__main__":
    cli.run(main)
