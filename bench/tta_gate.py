"""Gated and weighted TTA on a finished run's holdout, from the probabilities its folds saved for
every view set (holdout.npz): the fold ensemble's accuracy with each view set on every image, and
with the other views only for the images whose top probability under the first view is below a
gate (what `predict.py --tta-gate` does), with the views an image that implies.

    python bench/tta_gate.py --run-dir runs/fast-holdout --gates 0.5 0.7 0.8 0.9 0.95

The speed-up is in forward passes against every view on every image; predict's own time on the
test images is measured by running it (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import Table  # bench/common.py, beside this script; first, before torch loads
import numpy as np
import pandas as pd

from kaggle_cifar import cli
from kaggle_cifar.augment import TTA_VIEWS
from kaggle_cifar.data import read_labels
from kaggle_cifar.errors import RunDirError
from kaggle_cifar.folds import HOLDOUT
from kaggle_cifar.report import accuracy
from kaggle_cifar.rundir import RunDir


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished run trained with --holdout")
    parser.add_argument("--gates", type=cli.probability, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    cfg, classes = run.read()
    labels = read_labels(run.source()["input"])
    folds = pd.read_csv(run.path / "folds.csv")
    if not np.array_equal(folds["id"].to_numpy(), labels.ids):
        raise RunDirError(f"{run.path / 'folds.csv'}: not the ids of {run.source()['input']}")
    targets = labels.targets[folds["fold"].to_numpy() == HOLDOUT]
    if not len(targets):
        raise RunDirError(f"{run.path}: trained without --holdout")
    saved = [fold.read_holdout() for fold in run.folds(cfg)]
    ensemble = {name: np.mean([p[name] for p in saved], axis=0) for name in saved[0]}
    sure = ensemble["none"].max(1)
    table = Table()
    for name, views in TTA_VIEWS.items():
        if name == "none" or name not in ensemble:
            continue
        distinct = len(set(views))
        table.add(views=name, gate="-", accuracy=f"{accuracy(ensemble[name], targets):.4f}", share_gated="100%",
                  views_per_image=distinct, speedup="1.00")
        for gate in args.gates:
            unsure = sure < gate
            gated = np.where(unsure[:, None], ensemble[name], ensemble["none"])
            per_image = 1 + unsure.mean() * (distinct - 1)
            table.add(views=name, gate=gate, accuracy=f"{accuracy(gated, targets):.4f}",
                      share_gated=f"{unsure.mean():.1%}", views_per_image=f"{per_image:.2f}",
                      speedup=f"{distinct / per_image:.2f}")
    print(f"\n{run.path}: {len(saved)} fold(s), {len(targets):,} holdout images, TTA none alone "
          f"{accuracy(ensemble['none'], targets):.4f}\n")
    print(table)
    return 0


if __name__ == "__main__":
    cli.run(main)
