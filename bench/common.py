"""What the benchmark scripts print: the run's setting, and Markdown tables pasted as they are into
bench/RESULTS.md."""

from __future__ import annotations

import os

import kaggle_cifar  # noqa: F401  first: it sets OpenMP's wait policy, which torch reads as it loads
import numpy as np
import pandas as pd
import torch

from kaggle_cifar.config import TrainConfig
from kaggle_cifar.data import Labels, read_labels
from kaggle_cifar.device import Policy
from kaggle_cifar.errors import RunDirError
from kaggle_cifar.folds import HOLDOUT
from kaggle_cifar.rundir import FoldDir, RunDir


def setting(policy: Policy, cfg: TrainConfig) -> str:
    return (f"{policy.describe()}; torch {torch.__version__}; OpenMP wait {os.environ['OMP_WAIT_POLICY']}; "
            f"config: {cfg.describe()}")


def markdown_table(rows: list[dict], header: bool = True) -> str:
    """Rows with the same keys as a Markdown table (the keys are the header)."""
    columns = list(rows[0])
    head = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)] if header else []
    return "\n".join(head + ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows])


class Table:
    """A Markdown table whose rows are printed as soon as they are measured, so a run cut short
    keeps what it measured; str() is the whole table."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, **row) -> None:
        self.rows.append(row)
        print(markdown_table([row], header=False), flush=True)

    def __str__(self) -> str:
        return markdown_table(self.rows)


def warm_epochs(fold_dir: FoldDir) -> pd.DataFrame:
    """A fold's log rows after the first epoch (the one that pays for compilation and cuDNN
    autotuning), or its only row."""
    log = fold_dir.read_log()
    return log.iloc[1:] if len(log) > 1 else log


def holdout_of(run: RunDir) -> tuple[np.ndarray, Labels]:
    """Which of the run's training images it held out (a mask in the labels' id order, the order of
    its holdout predictions), and the labels."""
    labels = read_labels(run.source()["input"])
    folds = run.read_folds()
    if not np.array_equal(folds["id"].to_numpy(), labels.ids):
        raise RunDirError(f"{run.path / 'folds.csv'}: not the ids of {run.source()['input']}")
    holdout = folds["fold"].to_numpy() == HOLDOUT
    if not holdout.any():
        raise RunDirError(f"{run.path}: trained without --holdout")
    return holdout, labels
