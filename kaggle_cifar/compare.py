"""Runs side by side: a table (a row per run: its recipe, the settings that differ between the
runs, its accuracy with each TTA view set, training time, device) and a picture of accuracy
against training time, from each run dir's own files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from kaggle_cifar.config import TrainConfig, human_duration
from kaggle_cifar.plots import save_figure
from kaggle_cifar.report import headline
from kaggle_cifar.rundir import RunDir


@dataclasses.dataclass(frozen=True)
class Row:
    run: RunDir
    cfg: TrainConfig
    estimate: tuple[str, str, float] | None  # report.headline
    by_view_set: dict[str, float]            # accuracy with each TTA view set
    seconds: float                           # training time, its folds' epochs summed
    device: str


def row(run: RunDir) -> Row:
    cfg, _ = run.read()
    summary = run.read_report()
    if "holdout" in summary:  # the fold ensemble on the holdout: what a submission of the run does
        by_view_set = summary["holdout"]["ensemble_accuracy"]
    else:  # the folds' held-out accuracy, their mean
        by_view_set = {name: float(np.mean(accs)) for name, accs in summary.get("fold_accuracy_by_tta", {}).items()}
    seconds = sum(fold.read_result()["seconds"] for fold in run.folds(cfg))
    precisions = dict.fromkeys(p for fold in summary.get("precision_by_fold", []) if fold for p in fold.split(" then "))
    device = (f"{summary['device']}, {' then '.join(precisions)}" if "device" in summary
              else summary.get("computed_on", "-").removeprefix("device ").split(", training")[0])  # where, in what precision
    return Row(run, cfg, headline(summary), by_view_set, seconds, device)


def differing(rows: list[Row]) -> list[str]:
    """The config fields whose values are not the same in every run."""
    return [f.name for f in dataclasses.fields(TrainConfig)
            if len({repr(getattr(r.cfg, f.name)) for r in rows}) > 1 and f.name != "recipe"]


def table(rows: list[Row]) -> str:
    """The comparison as a Markdown table."""
    fields = differing(rows)
    views = list(dict.fromkeys(name for r in rows for name in r.by_view_set))
    lines = ["| run | recipe | settings | accuracy | " + " | ".join(f"TTA {v}" for v in views) + " | training | device |",
             "|" + " --- |" * (6 + len(views))]
    for r in rows:
        settings = ", ".join(f"{name}={getattr(r.cfg, name)}" for name in fields) or "-"
        accuracy = f"{r.estimate[0]} {r.estimate[2]:.4f}" if r.estimate else "-"
        per_view = " | ".join(f"{r.by_view_set[v]:.4f}" if v in r.by_view_set else "-" for v in views)
        lines.append(f"| {r.run} | {r.cfg.recipe or '-'} | {settings} | {accuracy} | {per_view} | "
                     f"{human_duration(r.seconds)} | {r.device} |")
    return "\n".join(lines)


def picture(rows: list[Row], path: Path) -> Path:
    """Accuracy against training time, a labelled point per run (runs without an estimate left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r.estimate is not None:
            ax.scatter(r.seconds / 60, r.estimate[2], color="tab:blue")
            ax.annotate(str(r.run.path.name), (r.seconds / 60, r.estimate[2]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xlabel("training time (minutes, folds summed)")
    ax.set_ylabel("accuracy (CV, or a full fit's holdout)")
    ax.grid(alpha=0.3)
    ax.set_title("runs compared")
    save_figure(fig, path)
    return path
