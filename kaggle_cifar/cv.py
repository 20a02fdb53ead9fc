"""Cross-validation: every fold of a run (under torchrun spread over the ranks as
distributed.fold_groups says), then the OOF
report: CV accuracy (a full fit's: its holdout accuracy), per-fold and per-class accuracy, and the
holdout's single folds against their ensemble."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_cifar import budget, distributed, plots, probe
from kaggle_cifar.config import RECIPES, TrainConfig, human_duration, parse_duration
from kaggle_cifar.data import Labels, load_test, load_train
from kaggle_cifar.device import Policy
from kaggle_cifar.errors import ConfigError
from kaggle_cifar.folds import HOLDOUT, DeviceTrainSet, FoldData, fold_split, held_out_by, trained_by
from kaggle_cifar.host_augment import load_pipeline
from kaggle_cifar.model import check_forward
from kaggle_cifar.pseudo import open_teacher, with_pseudo_labels
from kaggle_cifar.report import holdout_summary, oof_summary, view_sets_of_every
from kaggle_cifar.rundir import FoldDir, RunDir, folds_table
from kaggle_cifar.train import Progress, train_fold

log = logging.getLogger(__name__)


def check_input(input_dir: Path, cache_dir: Path, folds: int) -> str:
    """Validate every competition file (decoding each image, which also builds the cache)."""
    train = load_train(input_dir, cache_dir, folds)
    ids, _ = load_test(input_dir, cache_dir)
    return (f"input OK: {len(train.labels.ids)} training images in {len(train.labels.classes)} classes "
            f"({', '.join(train.labels.classes)}), {len(ids)} test images, {train.images.shape[1:]} uint8 each")


def check_named_files(cfg: TrainConfig) -> None:
    """The files the config names exist (and an albumentations pipeline loads): checked before the
    images are read and before a run writes anything."""
    problems = []
    if cfg.pretrained and not Path(cfg.pretrained).is_file():
        problems.append(f"--pretrained {cfg.pretrained}: no such file")
    if cfg.pseudo_labels and not Path(cfg.pseudo_labels).is_dir():
        problems.append(f"--pseudo-labels {cfg.pseudo_labels}: no such run dir")
    if cfg.albumentations and not Path(cfg.albumentations).is_file():
        problems.append(f"--albumentations {cfg.albumentations}: no such file")
    elif cfg.albumentations:
        load_pipeline(cfg.albumentations)
    if problems:
        raise ConfigError("; ".join(problems))


def train_folds(cfg: TrainConfig, input_dir: Path, run_dir: Path, cache_dir: Path,
                ctx: distributed.Context) -> dict | None:
    """Train every fold this rank owns (distributed.fold_groups); rank 0 returns the OOF report."""
    started = budget.clock()
    check_named_files(cfg)
    train = ctx.main_rank_first(lambda: load_train(input_dir, cache_dir, cfg.folds))
    run = RunDir(run_dir)
    cfg, choice, measured = chosen_recipe(cfg, train, run, ctx, started)
    check_forward(cfg, len(train.labels.classes), train.images.shape[1:3])
    probe.check_fits(cfg, len(train.labels.ids), len(train.labels.classes), train.images.shape[1:3], ctx.device)
    labels = train.labels
    fold_of = fold_split(cfg, labels)
    folds_csv = folds_table(labels.ids, fold_of)
    teacher = open_teacher(Path(cfg.pseudo_labels), folds_csv, labels.classes) if cfg.pseudo_labels else None
    with contextlib.ExitStack() as held:
        if ctx.is_main:
            held.enter_context(run.writer())  # one writer per run dir: a second training of it is refused
            run.create(cfg, labels.classes, folds_csv, {"input": input_dir, "cache_dir": cache_dir})
        ctx.barrier()
        test_images = ctx.main_rank_first(lambda: load_test(input_dir, cache_dir))[1] if teacher else None
        on_device = DeviceTrainSet.of(train, ctx.device)

        def fold_data(fold_dir: FoldDir) -> FoldData:
            data = on_device.fold(fold_of, fold_dir.fold)
            return with_pseudo_labels(data, cfg, teacher, test_images, ctx.policy) if teacher is not None else data

        plan, estimate = train_mine(cfg, run, fold_of, fold_data, ctx, started, measured)
        ctx.barrier()
        if not ctx.is_main:
            return None
        summary = write_oof_report(run, cfg, labels, fold_of, plan, estimate, ctx.policy, choice)
        if plots.available():
            plots.write_report(run, labels.ids, train.images)
        else:
            log.warning("report pictures skipped: matplotlib is not installed (pip install matplotlib)")
        return summary


def chosen_recipe(cfg: TrainConfig, train, run: RunDir, ctx: distributed.Context,
                  started: float) -> tuple[TrainConfig, dict, tuple[Policy, budget.Speed] | None]:
    """budget.choose_recipe's config, choice and measured policy and speed; under torchrun the ranks
    take one recipe: the first, in RECIPES' order, any rank chose."""
    cfg, choice, measured = budget.choose_recipe(cfg, train, ctx.policy, run.saved_config(), started)
    if choice and ctx.world_size > 1:
        names = [*RECIPES, cfg.recipe]
        agreed = names[int(ctx.smallest(names.index(cfg.recipe)))]
        measured = measured if agreed == cfg.recipe else None
        cfg = dataclasses.replace(cfg, recipe=agreed, **RECIPES.get(agreed, {}))
    return cfg, choice, measured


def train_mine(cfg: TrainConfig, run: RunDir, fold_of: np.ndarray, fold_data, ctx: distributed.Context,
               started: float, measured: tuple[Policy, budget.Speed] | None = None
               ) -> tuple[budget.Plan | None, dict | None]:
    """Train this rank's unfinished folds (with the ranks it shares them with): the precision
    measured and the run's time said first, from a few calibration steps of the first (or the
    policy and speed the recipe's choice `measured` on it), and under a budget the plan made from
    them, then one progress bar over them all. Returns the plan and the estimate with the time it
    actually took."""
    folds, replicas = distributed.fold_groups(ctx, cfg.folds)
    mine = [run.fold(k) for k in folds]
    unfinished = [fold_dir for fold_dir in mine if not fold_dir.finished()]
    plan = None
    if cfg.time_budget:  # counted from the run's start, less what earlier sessions of it spent
        plan = budget.Plan(cfg.time_budget_s, start=started - sum(f.seconds_spent() for f in mine),
                           folds_left=len(unfinished))
    made, speed, policy, training_started = {}, None, ctx.policy, budget.clock()
    if unfinished and (not unfinished[0].started() or ctx.policy.measure_precision):
        first = unfinished[0]
        made[first.fold] = fold_data(first)
        if measured is not None and replicas.size == 1:
            policy, speed = measured  # on fold 0, whose size any fold's is within one image of
            if cfg.pseudo_labels:  # but not with the pseudo-labelled images the folds add
                speed = budget.Speed.of(cfg, made[first.fold], policy)
        else:  # replicas measure again together: each measured the recipes alone
            policy, speed = budget.fastest_precision(cfg, made[first.fold], ctx.policy, replicas=replicas)
        if first.started():  # a resumed fold brings its own plan: the precision alone is chosen anew
            speed = None
    if plan is not None:  # every rank agrees once, before training
        plan.make(speed, ctx.smallest) if speed is not None else ctx.smallest(math.inf)
    epochs = plan.epochs if plan is not None and plan.epochs else cfg.epochs
    estimate = say_how_long(cfg, speed, len(unfinished), epochs, policy) \
        if speed is not None and replicas.writes else None  # (the first replica speaks for the fold)
    progress = Progress({f.fold: images_per_fold(cfg, fold_of, f.fold, epochs) for f in unfinished},
                        shown=replicas.writes)
    precision = budget.PrecisionWatch(policy)
    try:
        for fold_dir in unfinished:
            train_fold(cfg, made.pop(fold_dir.fold, None) or fold_data(fold_dir), fold_dir, precision.policy, plan,
                       progress=progress, precision=precision, replicas=replicas)
            if plan is not None:
                plan.fold_finished()
    finally:
        progress.close()
    if estimate is not None:
        estimate["actual_s"] = budget.clock() - training_started
    return plan, estimate


def images_per_fold(cfg: TrainConfig, fold_of: np.ndarray, fold: int, epochs: float) -> int:
    """The images fold `fold` trains in `epochs` epochs (whole batches; pseudo-labels not counted)."""
    train = int(trained_by(fold_of, fold).sum())
    batch = min(cfg.batch_size, train)
    return max(1, round(epochs * (train // batch))) * batch


LONG_RUN = "3h"  # a run longer than this is warned about, naming a recipe and budget that fit in it


def say_how_long(cfg: TrainConfig, speed: budget.Speed, folds: int, epochs: float, policy) -> dict:
    """Log what the run will take here, from the measured speed of its first fold, and warn when
    that is long; the estimate, for report.json."""
    seconds = speed.run_seconds(folds, epochs)
    how = f"planned for --time-budget {cfg.time_budget}" if cfg.time_budget else "from a few calibration steps"
    log.info("%d fold%s x %g epoch%s at %s images/s: about %s in all on %s in %s (%s)", folds,
             "s" if folds != 1 else "", epochs, "s" if epochs != 1 else "", f"{speed.images_per_s:,.0f}",
             human_duration(seconds), policy.device, policy.precision, how)
    if seconds > parse_duration(LONG_RUN) and not cfg.time_budget:
        faster = "" if cfg.recipe == "fast" else "--recipe fast "
        log.warning("warning: that is longer than %s: for a result within it here, %s--time-budget %s "
                    "(bench/RESULTS.md); Ctrl-C keeps the finished epochs", LONG_RUN, faster, LONG_RUN)
    return {"seconds": seconds, "images_per_s": speed.images_per_s, "folds": folds, "epochs": epochs,
            "device": str(policy.device), "precision": policy.precision}


def write_oof_report(run: RunDir, cfg: TrainConfig, labels: Labels, fold_of: np.ndarray,
                     plan: budget.Plan | None = None, estimate: dict | None = None,
                     policy: Policy | None = None, recipe_choice: dict | None = None) -> dict:
    """oof.csv and report.json from the finished folds' files (and, with a time budget, what of it
    was used and each fold's plan). A full fit's OOF is its holdout; without one it has none."""
    folds = run.folds(cfg)
    scored_by = np.full(len(fold_of), -1)  # the fold whose model scored each image: the OOF
    for fold_dir in folds:
        scored_by[held_out_by(fold_of, fold_dir.fold)] = fold_dir.fold
    scored = scored_by >= 0
    targets = labels.targets[scored]
    probs = np.zeros((scored.sum(), len(labels.classes)), dtype=np.float32)
    for fold_dir in folds:
        if (scored_by == fold_dir.fold).any():
            probs[scored_by[scored] == fold_dir.fold] = fold_dir.read_oof()
    summary = oof_summary(probs, targets, scored_by[scored], labels.classes, full_fit=cfg.full_fit)
    results = [fold_dir.read_result() for fold_dir in folds]
    every_fold = view_sets_of_every([r["accuracy_by_tta"] for r in results])
    summary["fold_accuracy_by_tta"] = {name: [r["accuracy_by_tta"][name] for r in results] for name in every_fold} \
        if scored.any() else {}
    if policy is not None:  # the device line the run started with; the precision each fold trained in
        summary["computed_on"], summary["device"] = policy.describe(), policy.where()
        summary["precision_by_fold"] = [r.get("precision") for r in results]
    if estimate is not None:
        summary["estimate"] = estimate
    if recipe_choice:
        summary["recipe_choice"] = recipe_choice
    if plan is not None:
        summary["time_budget"] = {"budget_s": plan.seconds, "used_s": budget.clock() - plan.start,
                                  "epochs_per_fold": [r["epochs"] for r in results],
                                  "plans": [r.get("plan") for r in results]}
    holdout = (fold_of == HOLDOUT) & ~scored
    if holdout.any():
        summary["holdout"] = holdout_summary([fold_dir.read_holdout() for fold_dir in folds], labels.targets[holdout])
    classes = np.asarray(labels.classes)
    oof = pd.DataFrame({"id": labels.ids[scored], "fold": scored_by[scored], "label": classes[targets],
                        "prediction": classes[probs.argmax(1)]})
    run.write_oof_csv(pd.concat([oof, pd.DataFrame(probs, columns=[f"p_{c}" for c in labels.classes])], axis=1))
    run.write_report(summary)
    return summary
