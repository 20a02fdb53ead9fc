"""The run's report as pictures (matplotlib, optional): learning curves, confusion matrix, per-class
accuracy, and the most confident OOF mistakes. Written into RUN_DIR/report/ from the run's own files
(fold logs, report.json, oof.csv) plus the training images, so `scripts/report.py` can redo them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_cifar.atomic import atomic_path
from kaggle_cifar.report import headline
from kaggle_cifar.rundir import RunDir

log = logging.getLogger(__name__)


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def learning_curves(run: RunDir, folds: int):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for fold in range(folds):
        log_csv = run.fold(fold).read_log()
        line, = ax_loss.plot(log_csv["epoch"], log_csv["train_loss"], label=f"fold {fold} train")
        ax_loss.plot(log_csv["epoch"], log_csv["val_loss"], "--", color=line.get_color(), label=f"fold {fold} val")
        ax_acc.plot(log_csv["epoch"], log_csv["train_acc"], color=line.get_color(), label=f"fold {fold} train")
        ax_acc.plot(log_csv["epoch"], log_csv["val_acc"], "--", color=line.get_color(), label=f"fold {fold} val")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs end on whole numbers (a budget's last excepted)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7, ncol=2)
    fig.suptitle("training (solid) and held-out (dashed) per fold")
    return fig


def confusion(summary: dict):
    import matplotlib.pyplot as plt

    matrix, classes = np.array(summary["confusion"]), summary["classes"]
    rates = matrix / matrix.sum(1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), [f"{c} ({summary['per_class_accuracy'][c]:.1%})" for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (per-class accuracy)")
    name, what, value = headline(summary)
    ax.set_title(f"OOF confusion matrix ({what}), {name} accuracy {value:.2%}")
    return fig


def per_class(summary: dict):
    import matplotlib.pyplot as plt

    classes = summary["classes"]
    acc = [summary["per_class_accuracy"][c] for c in classes]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(classes, acc, color="tab:blue")
    name, _, value = headline(summary)
    ax.axhline(value, color="tab:red", linestyle="--", label=f"{name} accuracy")
    ax.set_ylim(0, 1)
    ax.set_ylabel("OOF accuracy")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
    return fig


def confident_mistakes(oof: pd.DataFrame, ids: np.ndarray, images: np.ndarray, count: int = 32):
    """The wrong OOF predictions with the highest predicted probability: label noise or hard cases."""
    import matplotlib.pyplot as plt

    wrong = oof[oof["label"] != oof["prediction"]].copy()
    predicted_column = wrong.columns.get_indexer("p_" + wrong["prediction"])
    wrong["confidence"] = wrong.to_numpy()[np.arange(len(wrong)), predicted_column].astype(float)
    wrong = wrong.nlargest(count, "confidence")
    cols = 8
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.75), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    rows_of = pd.Index(ids).get_indexer(wrong["id"])
    for ax, row_of, (_, row) in zip(axes.flat, rows_of, wrong.iterrows()):
        ax.imshow(images[row_of])
        ax.set_title(f"#{row['id']} {row['label']}\n-> {row['prediction']} {row['confidence']:.0%}", fontsize=6)
    fig.suptitle("most confident OOF mistakes (id, true -> predicted, probability)")
    return fig


def write_report(run: RunDir, train_ids: np.ndarray, train_images: np.ndarray) -> list[Path]:
    """All report PNGs; `train_images` holds the image of each of `train_ids`, row by row."""
    import matplotlib

    matplotlib.use("Agg")
    summary = run.read_report()
    oof = run.read_oof_csv()
    out = run.report_pictures
    figures = {"curves.png": learning_curves(run, run.read()[0].folds)}
    if headline(summary) is not None:  # a full fit without a holdout has no held-out predictions to draw
        figures |= {"confusion.png": confusion(summary), "per_class.png": per_class(summary),
                    "mistakes.png": confident_mistakes(oof, train_ids, train_images)}
    for name, fig in figures.items():
        save_figure(fig, out / name)
    log.info("report pictures: %s", out)
    return [out / name for name in figures]


SEARCH_TARGET = "held-out accuracy (fold 0)"  # what a search's trials are scored by, on the pictures' axes
FEW_TRIALS = 5  # fewer completed trials than this: the importance picture says its numbers are noise


def write_search_pictures(study, folder: Path) -> list[Path]:
    """A search's pictures, drawn by Optuna: accuracy per trial with the best so far, accuracy
    against each parameter, and (with two or more parameters and completed trials) the parameters'
    importance."""
    import warnings

    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as optuna_plots
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # few trials: flat axes, equal importances
        for name, draw in [("history", optuna_plots.plot_optimization_history), ("slices", optuna_plots.plot_slice),
                           ("importance", optuna_plots.plot_param_importances)]:
            try:
                axes = draw(study, target_name=SEARCH_TARGET)
            except (ValueError, RuntimeError) as e:  # importance with too few trials or a single parameter
                log.info("search picture %s skipped: %s", name, e)
                plt.close("all")
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            if name == "importance" and complete < FEW_TRIALS:
                figure.suptitle(f"from {complete} completed trials: too few for the importances to mean much",
                                color="tab:red")
            save_figure(figure, folder / f"{name}.png")
            written.append(folder / f"{name}.png")
    return written
