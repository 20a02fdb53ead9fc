"""--time-budget: how many epochs each fold trains, so that all of a rank's folds end within the
budget with complete learning-rate schedules.

A fold's share is what is left of the budget divided by the folds left (`Budget`). Its epochs are
planned from the speed of a few calibration steps (`plan_fold`), then planned again at every epoch
end from the epochs' measured time (`FoldPlan.after_epoch`); train.train_fold stretches or
compresses the schedule to the new plan, never cuts it short. Time is read from `clock`, which the
tests replace."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from kaggle_cifar import train
from kaggle_cifar.config import PREDICT_BATCH, TrainConfig
from kaggle_cifar.device import Policy, synchronize
from kaggle_cifar.folds import FoldData
from kaggle_cifar.augment import TTA_VIEWS
from kaggle_cifar.inference import DISTINCT_VIEWS, for_inference, stream_probs

log = logging.getLogger(__name__)

clock = time.monotonic

# The share a fold plans for: full-data runs on the CPU ended 0.7% and 2% past a 15-minute budget
# planned at 100% (the finish and the report took longer than estimated).
PLANNED_SHARE = 0.97
MEASURED_EPOCHS = 3  # a re-plan reads the mean time of the last few epochs


@dataclass
class Budget:
    """The run's budget on this rank: `seconds` from `start` (on `clock`) for its unfinished folds."""
    seconds: float
    start: float
    folds_left: int

    def next_fold_deadline(self) -> float:
        """The clock time by which the next fold must end: an equal share of what is left."""
        now = clock()
        deadline = now + PLANNED_SHARE * max(0.0, self.start + self.seconds - now) / max(1, self.folds_left)
        self.folds_left -= 1
        return deadline


@dataclass
class FoldPlan:
    """A fold's epochs under a budget and what they were planned from. Saved in its checkpoints
    (`state_dict`) and result.json; a fold resumed from a checkpoint keeps the plan saved there and
    is not planned again (`deadline` None)."""
    epochs: int
    deadline: float | None  # on `clock`
    step_seconds: float = 0.0
    epoch_seconds: float = 0.0
    reserve_s: float = 0.0  # kept back for the fold's final predictions
    replans: list[dict] = field(default_factory=list)
    epoch_times: list[float] = field(default_factory=list)
    mark: float = field(default_factory=lambda: clock())

    def epochs_that_fit(self, epoch_seconds: float, done: int) -> int:
        """The `done` epochs and as many more as fit before the deadline, keeping the reserve; at
        least one more, so the schedule completes."""
        return done + max(1, int((self.deadline - clock() - self.reserve_s) // epoch_seconds))

    def after_epoch(self, done: int, fold: int) -> bool:
        """Plan again after `done` epochs from the measured time of the last ones (each from one
        call to the next: the epoch, its evaluation, the checkpoint before it); true if the
        epochs changed."""
        now = clock()
        self.epoch_times.append(now - self.mark)
        self.mark = now
        if self.deadline is None:
            return False
        measured = self.epoch_times[-MEASURED_EPOCHS:]
        epochs = self.epochs_that_fit(sum(measured) / len(measured), done)
        if epochs == self.epochs:
            return False
        log.info("fold %d: re-planned after epoch %d: %d epochs instead of %d", fold, done, epochs, self.epochs)
        self.replans.append({"after_epoch": done, "epochs": epochs})
        self.epochs = epochs
        return True

    def state_dict(self) -> dict:
        deadline_in_s = self.deadline - clock() if self.deadline is not None else None
        return {"epochs": self.epochs, "deadline_in_s": deadline_in_s, "step_seconds": self.step_seconds,
                "epoch_seconds": self.epoch_seconds, "reserve_s": self.reserve_s, "replans": list(self.replans)}

    def load_state_dict(self, state: dict) -> None:
        """The plan a checkpoint saved; the fold goes on to its epochs without planning again."""
        self.epochs, self.deadline = state["epochs"], None
        self.step_seconds, self.epoch_seconds = state.get("step_seconds", 0.0), state.get("epoch_seconds", 0.0)
        self.reserve_s, self.replans = state.get("reserve_s", 0.0), list(state.get("replans", []))

    @classmethod
    def resuming(cls) -> "FoldPlan":
        """The plan of a fold that resumes: filled from its checkpoint by load_state_dict."""
        return cls(epochs=0, deadline=None)


def forward_seconds(models: list[torch.nn.Module], images: torch.Tensor, policy: Policy,
                    batch_size: int = PREDICT_BATCH) -> float:
    """Seconds per image of stream_probs over `images` (one view), after a warm-up batch that pays
    for any compilation."""
    stream_probs(models, images[:batch_size], TTA_VIEWS["none"], policy, batch_size)
    synchronize(policy.device)
    t0 = clock()
    stream_probs(models, images, TTA_VIEWS["none"], policy, batch_size)
    synchronize(policy.device)
    return (clock() - t0) / max(1, len(images))


def calibrate(cfg: TrainConfig, data: FoldData, policy: Policy, steps: int = 5, images: int | None = None,
              forward_compiled: bool = False) -> tuple[float, float]:
    """Seconds per training step (augmentation included) and per held-out image predicted (by the
    model compiled for inference with `forward_compiled`), measured on a throwaway copy of the
    fold's training after a warm-up that pays for any compilation: `steps` steps, and `images`
    held-out images (default: four training batches)."""
    t = train.build_training(cfg, data, policy)
    t.scheduler = train.one_cycle(t.optimizer, cfg, 2 + steps)  # as long as the calibration, whatever the data
    device = policy.device
    generator, flips = torch.Generator(device).manual_seed(0), train.epoch_flips(cfg, data, 0)

    def step(i: int) -> None:
        idx = torch.randint(len(data.train_targets), (t.batch_size,), generator=generator, device=device)
        flipped = None if flips is None else flips[idx]
        train.train_step(t, train.augment(data.train_images[idx], cfg, generator, flipped), data.train_targets[idx],
                         i + 1)

    step(0)
    step(1)
    synchronize(device)
    t0 = clock()
    for i in range(steps):
        step(2 + i)
    synchronize(device)
    seconds_per_step = (clock() - t0) / steps
    held_out = (data.val_images if len(data.val_images) else data.train_images)[:images or 4 * t.batch_size]
    inference = Policy(policy.device, policy.autocast_dtype, policy.newton_schulz_dtype, forward_compiled)
    models = for_inference([t.model.eval()], inference, 0, PREDICT_BATCH)
    return seconds_per_step, forward_seconds(models, held_out, inference, PREDICT_BATCH)


def plan_fold(cfg: TrainConfig, data: FoldData, policy: Policy, deadline: float) -> FoldPlan:
    """The fold's first plan under a time budget: its epochs, and what they were planned from."""
    step_seconds, image_seconds = calibrate(cfg, data, policy)
    steps = len(data.train_targets) // min(cfg.batch_size, len(data.train_targets))
    epoch_seconds = steps * step_seconds + min(train.EPOCH_EVAL_IMAGES, len(data.val_targets)) * image_seconds
    reserve = len(DISTINCT_VIEWS) * (len(data.val_targets) + len(data.holdout_images)) * image_seconds
    plan = FoldPlan(epochs=0, deadline=deadline, step_seconds=step_seconds, epoch_seconds=epoch_seconds,
                    reserve_s=reserve)
    plan.epochs = plan.epochs_that_fit(epoch_seconds, 0)
    return plan
