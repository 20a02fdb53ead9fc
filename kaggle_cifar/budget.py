"""--time-budget: how many epochs the folds train, so that all of a rank's folds end within the
budget with complete learning-rate schedules, every fold training as long as the others.

The run's `Plan` is made once, before its first fold, from the speed of a few calibration steps
(charged to the run, like everything else that takes time); every fold trains its epochs, a
fraction of an epoch included, so that the budget is used to the step. At each epoch end the plan
reads the epochs' measured time: the first measured one replaces the calibration's estimate, later
ones re-plan only when the speed moved by more than REPLAN_MARGIN; the folds still to come then
train the new epochs too. train.train_fold stretches or
compresses the schedule to the new plan, never cuts it short. Under torchrun the ranks agree on the
smallest plan, so every fold of the run trains alike. Time is read from `clock`, which the tests
replace."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from kaggle_cifar import train
from kaggle_cifar.augment import TTA_VIEWS
from kaggle_cifar.config import LEARNING_CURVES, PREDICT_BATCH, RECIPES, TrainConfig
from kaggle_cifar.data import TrainSet
from kaggle_cifar.device import Policy, synchronize
from kaggle_cifar.distributed import Replicas
from kaggle_cifar.errors import ConfigError
from kaggle_cifar.folds import DeviceTrainSet, FoldData, fold_split
from kaggle_cifar.inference import DISTINCT_VIEWS, for_inference, stream_probs

log = logging.getLogger(__name__)

clock = time.monotonic

# The share of the budget that is planned: full-data runs on the CPU ended 0.7% and 2% past a
# 15-minute budget planned at 100% (the finish and the report took longer than estimated).
PLANNED_SHARE = 0.97
# The first measured epoch replaces the calibration's estimate (a few steps overestimated the epochs
# of a 20-minute full-data run by 13.5%, leaving 14% of the budget unused). After that a re-plan needs
# the mean time of the last MEASURED_EPOCHS epochs REPLAN_MARGIN off the planned one. Either way the
# run's end must move by a REPLAN_SHARE of the budget: noise does not move the plan (nor the progress
# bar's total), a machine that got slower or faster does. A fold's first epoch (its start-up) is not
# measured.
REPLAN_MARGIN = 0.15
REPLAN_SHARE = 0.02
MEASURED_EPOCHS = 3


@dataclass
class Plan:
    """The epochs every fold of the run trains under its budget, and what they were planned from.
    Saved in each fold's checkpoints (`state_dict`) and result.json."""
    seconds: float          # the budget
    start: float            # on `clock`: when the run began, less what earlier sessions of it spent
    folds_left: int         # folds this rank has yet to finish, the one training included
    epochs: float = 0.0     # per fold; a fraction trains part of a last epoch
    epoch_seconds: float = 0.0  # one epoch: its steps, its evaluation and its checkpoint
    step_seconds: float = 0.0
    reserve_s: float = 0.0  # a fold's final predictions (its held-out images in every view)
    replans: list[dict] = field(default_factory=list)
    mark: float = field(default_factory=lambda: clock())
    measured: list[float] = field(default_factory=list)  # this fold's epoch times since the last re-plan
    calibrated_only: bool = True  # no epoch measured yet: the plan rests on the calibration steps

    @property
    def deadline(self) -> float:
        return self.start + PLANNED_SHARE * self.seconds

    def epochs_that_fit(self, epoch_seconds: float, done: float = 0.0) -> float:
        """Epochs for the training fold (`done` of them trained) and each fold after it, so that
        all of them, their final predictions included, end by the deadline; at least a little
        more than `done`, so the schedule completes."""
        left = self.deadline - clock() - self.folds_left * self.reserve_s
        epochs = (left / epoch_seconds + done) / max(1, self.folds_left)
        return max(done + 0.05, math.floor(epochs * 100) / 100)

    def after_epoch(self, done: int, fold: int) -> bool:
        """After `done` epochs of fold `fold`: plan again if its last epochs (each from the previous
        call to this one) ran far enough off the plan (REPLAN_MARGIN, REPLAN_SHARE); true if the
        epochs changed."""
        now = clock()
        epoch, self.mark = now - self.mark, now
        if done > 1:  # the fold's first epoch pays for its start-up
            self.measured = (self.measured + [epoch])[-MEASURED_EPOCHS:]
        if not self.measured:
            return False
        measured = sum(self.measured) / len(self.measured)
        left = self.epochs - done + (self.folds_left - 1) * self.epochs  # epochs still to train, this rank
        off = abs(measured / self.epoch_seconds - 1) > REPLAN_MARGIN or self.calibrated_only
        self.calibrated_only = False
        if not off or abs(measured - self.epoch_seconds) * left <= REPLAN_SHARE * self.seconds:
            return False
        # the final predictions slow down (or speed up) with the epochs: the same machine computes them
        self.reserve_s *= measured / self.epoch_seconds
        self.epoch_seconds, self.measured = measured, []
        epochs = self.epochs_that_fit(measured, done)
        if epochs == self.epochs:
            return False
        log.info("fold %d: re-planned after epoch %d (an epoch took %.1f s): %g epochs a fold instead of %g",
                 fold, done, measured, epochs, self.epochs)
        self.replans.append({"fold": fold, "after_epoch": done, "epochs": epochs})
        self.epochs = epochs
        return True

    def speed_changed(self) -> None:
        """The fold trains differently from now on (another precision): the next epoch measured
        replaces the epochs measured so far, as the first one replaced the calibration's estimate."""
        self.mark, self.measured, self.calibrated_only = clock(), [], True

    def fold_finished(self) -> None:
        self.folds_left -= 1
        self.mark, self.measured = clock(), []  # the next fold's epochs are measured from its own start

    def state_dict(self) -> dict:
        return {"epochs": self.epochs, "step_seconds": self.step_seconds, "epoch_seconds": self.epoch_seconds,
                "reserve_s": self.reserve_s, "replans": list(self.replans)}

    def load_state_dict(self, state: dict) -> None:
        """A resumed fold's plan, as its checkpoint saved it (an earlier plan's fields missing)."""
        self.epochs = state["epochs"]
        self.epoch_seconds = state.get("epoch_seconds") or self.epoch_seconds or 1.0
        self.step_seconds, self.reserve_s = state.get("step_seconds", 0.0), state.get("reserve_s", 0.0)
        self.replans = list(state.get("replans", []))
        self.mark, self.calibrated_only = clock(), False

    def make(self, speed: "Speed", agree=lambda epochs: epochs) -> None:
        """The run's epochs, from the speed measured on its first fold to train; `agree` makes every
        rank take the smallest plan."""
        self.step_seconds, self.epoch_seconds, self.reserve_s = speed.step_seconds, speed.epoch_s, speed.reserve_s
        self.epochs = agree(self.epochs_that_fit(self.epoch_seconds))
        self.mark = clock()


WARMUP_STEPS, CALIBRATION_STEPS = 2, 5  # the first pay for any compilation; the rest are timed


@dataclass(frozen=True)
class Speed:
    """A fold's measured costs: a training step, an epoch (its steps and evaluation), the final
    predictions (its held-out images in every view); and what a run of them takes."""
    step_seconds: float
    epoch_s: float
    reserve_s: float
    images_per_s: float

    @classmethod
    def of(cls, cfg: TrainConfig, data: FoldData, policy: Policy, train_images: int | None = None,
           held_out: tuple[int, int] | None = None, replicas: Replicas = Replicas(),
           limit: float = math.inf, steps: int = CALIBRATION_STEPS) -> "Speed | None":
        """Measured on `data` (calibrate, `steps` timed steps, with the fold's `replicas`), for a
        fold of `train_images` images and `held_out` (validation, holdout) images, by default
        `data`'s; None if its steps ran past `limit` seconds (calibrate)."""
        measured = calibrate(cfg, data, policy, steps, replicas=replicas, limit=limit)
        if measured is None:
            return None
        step_seconds, image_seconds = measured
        train_images = train_images or len(data.train_targets)
        validation, holdout = held_out or (len(data.val_targets), len(data.holdout_images))
        batch = min(cfg.batch_size, train_images)
        epoch_s = train_images // batch * step_seconds + min(train.EPOCH_EVAL_IMAGES, validation) * image_seconds
        return cls(step_seconds, epoch_s, len(DISTINCT_VIEWS) * (validation + holdout) * image_seconds,
                   batch / step_seconds)

    def run_seconds(self, folds: int, epochs: float) -> float:
        return folds * (epochs * self.epoch_s + self.reserve_s)


def fastest_precision(cfg: TrainConfig, data: FoldData, policy: Policy, train_images: int | None = None,
                      held_out: tuple[int, int] | None = None,
                      replicas: Replicas = Replicas(), steps: int = CALIBRATION_STEPS) -> tuple[Policy, Speed]:
    """Of the policy's precision candidates, the one whose calibration steps ran fastest here (on
    the first of the fold's `replicas`, for all of them), and its speed (Speed.of; the policy
    itself, measured, where there is no choice). float32, the reference, is measured first; a
    candidate whose steps take SLOWER_BY times the reference's whole calibration is stopped there,
    slower (calibrate: one replica alone)."""
    candidates = policy.precision_candidates()
    speeds = reference_first(candidates, lambda candidate, limit: Speed.of(
        cfg, data, candidate, train_images, held_out, replicas, limit, steps))
    order = [c for c in candidates if speeds[c] is not None]
    fastest = order[replicas.first(min(range(len(order)), key=lambda i: speeds[order[i]].step_seconds))]
    if len(speeds) > 1 and replicas.writes:  # the first replica's measurement, which chose, is the one said
        say_fastest({c: speeds[c] and speeds[c].images_per_s for c in candidates}, fastest, "trains")
    return fastest, speeds[fastest]


def reference_first(candidates: tuple[Policy, ...], measure) -> dict:
    """`measure(candidate, limit)` of each precision candidate, float32 (the reference) first; each
    later one given SLOWER_BY times the quickest whole measurement before it as its `limit`, past
    which `measure` stops and returns None (slower)."""
    measured, limit = {}, math.inf
    for candidate in sorted(candidates, key=lambda c: c.autocast_dtype is not None):
        started = clock()
        measured[candidate] = measure(candidate, limit)
        if measured[candidate] is not None:
            limit = min(limit, SLOWER_BY * (clock() - started))
    return measured


def say_fastest(images_per_s: dict[Policy, float | None], fastest: Policy, does: str) -> None:
    """The log line of a precision measurement: `precision on cpu, measured: bf16 autocast 412
    images/s, float32 227 images/s: bf16 autocast trains`; a candidate stopped as slower (None)
    `bf16 autocast stopped, slower`."""
    log.info("precision on %s, measured: %s: %s %s", fastest.device, ", ".join(
        f"{c.precision} {f'{rate:,.0f} images/s' if rate is not None else 'stopped, slower'}"
        for c, rate in images_per_s.items()), fastest.precision, does)


PRECISION_PROBE_IMAGES = 512  # timed per candidate, after a warm-up batch of half as many


def fastest_for_inference(models: list[torch.nn.Module], images, policy: Policy) -> Policy:
    """Of the policy's precision candidates, the one whose forward passes of `models` (eager) over
    a few hundred of `images` ran fastest here; the policy itself where there is no choice. float32
    is measured first; a candidate whose warm-up takes SLOWER_BY times float32's whole measurement
    is stopped there, slower."""
    candidates = policy.precision_candidates()
    if len(candidates) == 1:
        return policy
    sample = images[:PRECISION_PROBE_IMAGES]
    seconds = reference_first(candidates, lambda candidate, limit: forward_seconds(
        models, sample, dataclasses.replace(candidate, compile=False), len(sample) // 2, limit))
    fastest = min((c for c in candidates if seconds[c] is not None), key=seconds.get)
    say_fastest({c: seconds[c] and 1 / seconds[c] for c in candidates}, fastest, "predicts")
    return fastest


# A fold's training speed this far off the speed its precision was chosen at (another process
# started or stopped beside it; on the Xeon bf16 fell from 1.6x float32's speed to 0.1-0.4x) has
# both precisions measured again. Epoch-to-epoch noise alone moved it by 10% (bench/RESULTS.md).
# Only epochs of at least 1/PRECISION_CHECK_SHARE times the steps a measurement takes are read: the
# check costs at most that share of an epoch, and a speed from a few steps is noise.
PRECISION_MARGIN = 0.25
PRECISION_CHECK_SHARE = 0.1


class PrecisionWatch:
    """Where the policy measures its precision, the training speed at every epoch end (a fold's
    first epoch, its start-up, and epochs too short to read aside) against the speed of the first
    epoch after the precision was chosen: off by more than PRECISION_MARGIN, the candidates are
    measured again and the faster trains on. `policy` is the one training now."""

    def __init__(self, policy: Policy):
        self.policy, self.reference = policy, None

    def after_epoch(self, cfg: TrainConfig, data: FoldData, row: dict) -> bool:
        """After the epoch of log row `row`: true if the policy changed."""
        measuring = len(self.policy.precision_candidates()) * (WARMUP_STEPS + CALIBRATION_STEPS)
        if not self.policy.measure_precision or row["epoch"] == 1 or row["steps"] * PRECISION_CHECK_SHARE < measuring:
            return False
        speed = row["train_images_per_s"]
        if self.reference is None:  # the first epoch read since the choice
            self.reference = speed
            return False
        if abs(speed / self.reference - 1) <= PRECISION_MARGIN:
            return False
        log.info("fold %d, epoch %d: training ran at %.0f images/s, %.0f when %s was chosen: measuring again",
                 data.fold, row["epoch"], speed, self.reference, self.policy.precision)
        before, self.reference = self.policy, None  # the next epoch's speed is the new reference
        self.policy, _ = fastest_precision(cfg, data, before)
        return self.policy != before


def expected_accuracy(recipe: str, epochs: float) -> float | None:
    """The measured learning curve of `recipe` at `epochs` (linear between measured lengths, the
    last beyond them); None below its first measured length or for a recipe not measured."""
    curve = sorted(LEARNING_CURVES.get(recipe, {}).items())
    if not curve or epochs < curve[0][0]:
        return None
    below = [(e, a) for e, a in curve if e <= epochs][-1]
    above = next(((e, a) for e, a in curve if e > epochs), None)
    if above is None:
        return below[1]
    return below[1] + (above[1] - below[1]) * (epochs - below[0]) / (above[0] - below[0])


def choose_recipe(cfg: TrainConfig, train: TrainSet, policy: Policy, saved: TrainConfig | None,
                  started: float) -> tuple[TrainConfig, dict, tuple[Policy, Speed] | None]:
    """Under --time-budget with no --recipe (and none of a recipe's settings given), the recipe
    expected to score best in that time here: each one's epochs that fit, from a few calibration
    steps of it on this device (in the faster precision, where that is measured), read on its
    measured learning curve. Every recipe is planned once all are measured, in what the budget of
    the run (begun at `started`) has left then, the measurements' time spent: the epochs a curve is
    read at are those the chosen recipe then trains. A run dir made before keeps the recipe chosen
    then. Returns the config, what a choice was made from, and the policy and speed measured for
    the chosen recipe (None: not measured)."""
    set_by_recipes = {key for values in RECIPES.values() for key in values}
    defaults = TrainConfig()
    if not cfg.time_budget or cfg.recipe or any(getattr(cfg, k) != getattr(defaults, k) for k in set_by_recipes):
        return cfg, {}, None
    candidates = {}
    for name, values in RECIPES.items():
        try:
            candidates[name] = dataclasses.replace(cfg, recipe=name, **values)
        except ConfigError:  # a recipe the other flags given rule out (--whiten-stem and fast_cifar)
            continue
    for name, candidate in candidates.items():
        if saved == candidate:
            return candidate, {"chosen": name, "why": "the recipe this run dir was made with"}, None
    speeds = {}
    for name, candidate in candidates.items():
        if LEARNING_CURVES.get(name):  # without a curve nothing reads its epochs: not worth its calibration
            data = DeviceTrainSet.of(train, policy.device).fold(fold_split(candidate, train.labels), 0)
            speeds[name] = fastest_precision(candidate, data, policy)
    measured = {}
    for name, candidate in candidates.items():
        if name not in speeds:
            measured[name] = {"epochs": None, "expected_accuracy": None}
            continue
        plan = Plan(candidate.time_budget_s, start=started, folds_left=candidate.folds)
        plan.make(speeds[name][1])
        measured[name] = {"epochs": plan.epochs, "expected_accuracy": expected_accuracy(name, plan.epochs),
                          "precision": speeds[name][0].precision}
    known = {name: m for name, m in measured.items() if m["expected_accuracy"] is not None}
    chosen = max(known, key=lambda name: known[name]["expected_accuracy"]) if known else None
    why = "; ".join(name + ": " + ("its learning curve not measured" if m["epochs"] is None else
                                   f"{m['epochs']:g} epochs a fold fit in {m['precision']}, "
                                   + (f"{m['expected_accuracy']:.3f} expected on its measured curve"
                                      if m["expected_accuracy"] else "its learning curve not measured that short"))
                    for name, m in measured.items())
    log.info("--time-budget %s without --recipe, on %s: %s (%s)", cfg.time_budget, policy.device,
             chosen or "the defaults, no recipe measured for this budget", why)
    return (candidates[chosen] if chosen else cfg), {"chosen": chosen, "why": why, "candidates": measured}, \
        speeds.get(chosen)


def forward_seconds(models: list[torch.nn.Module], images: torch.Tensor, policy: Policy,
                    batch_size: int = PREDICT_BATCH, limit: float = math.inf) -> float | None:
    """Seconds per image of stream_probs over `images` (one view), after a warm-up batch that pays
    for any compilation; None, and nothing more measured, if the warm-up ran past `limit` seconds
    (a candidate slower than one measured before it)."""
    started = clock()
    stream_probs(models, images[:batch_size], TTA_VIEWS["none"], policy, batch_size)
    synchronize(policy.device)
    if clock() - started > limit:
        return None
    t0 = clock()
    stream_probs(models, images, TTA_VIEWS["none"], policy, batch_size)
    synchronize(policy.device)
    return (clock() - t0) / max(1, len(images))


# A precision candidate measured after the reference stops once its training steps (warm-up
# included), or its forward passes' warm-up, have taken this many times the reference's whole
# measurement: on the Intel Xeon beside another process bf16 trained at 0.1-0.4x float32's speed,
# so its 7 steps cost up to 10 times the reference's, at the run's start and at every measurement
# again. Twice, not once: a faster candidate whose first steps pay more for their start-up is never
# stopped.
SLOWER_BY = 2.0


def calibrate(cfg: TrainConfig, data: FoldData, policy: Policy, steps: int = CALIBRATION_STEPS,
              images: int | None = None, forward_compiled: bool = False,
              replicas: Replicas = Replicas(), limit: float = math.inf) -> tuple[float, float] | None:
    """Seconds per training step (augmentation included; the fold's `replicas` stepping together)
    and per held-out image predicted (by the model compiled for inference with
    `forward_compiled`), measured on a throwaway copy of the fold's training after a warm-up that
    pays for any compilation: `steps` steps, and `images` held-out images (default: four training
    batches). None, and nothing more measured, once the steps have run past `limit` seconds from
    the start (a candidate slower than one measured before it); replicas step together to the end,
    since one stopping alone would leave the others waiting in a collective."""
    started = clock()
    t = train.build_training(cfg, data, policy, replicas=replicas)
    t.scheduler = train.one_cycle(t.optimizer, cfg, WARMUP_STEPS + steps)  # as long as the calibration
    device = policy.device
    generator, flips = torch.Generator(device).manual_seed(0), train.epoch_flips(cfg, data, 0)

    def step(i: int) -> None:
        idx = torch.randint(len(data.train_targets), (t.batch_size,), generator=generator, device=device)
        flipped = None if flips is None else flips[idx]
        train.train_step(t, *t.share(train.augment(data.train_images[idx], cfg, generator, flipped),
                                     data.train_targets[idx]), i + 1)

    def past_limit() -> bool:
        if limit == math.inf or replicas.size > 1:
            return False
        synchronize(device)
        return clock() - started > limit

    for i in range(WARMUP_STEPS):
        step(i)
        if past_limit():
            return None
    synchronize(device)
    t0 = clock()
    for i in range(steps):
        step(WARMUP_STEPS + i)
        if past_limit():
            return None
    synchronize(device)
    seconds_per_step = (clock() - t0) / steps
    held_out = (data.val_images if len(data.val_images) else data.train_images)[:images or 4 * t.batch_size]
    inference = dataclasses.replace(policy, compile=forward_compiled)
    models = for_inference([t.model.eval()], inference, 0, cfg.predict_batch)
    return seconds_per_step, forward_seconds(models, held_out, inference, cfg.predict_batch)
