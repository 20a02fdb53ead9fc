"""Train one fold, top to bottom: build (or resume), then for every epoch `train_one_epoch`,
`evaluate`, `log_and_checkpoint`; then `finish` writes the final model, the fold's OOF and holdout
probabilities and its result. The fold's files are described in rundir.FoldDir."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3
from tqdm import tqdm

from kaggle_cifar import checkpoint
from kaggle_cifar.augment import TTA_VIEWS, auto_augment, cutout, flip_crop
from kaggle_cifar.config import PREDICT_BATCH, TrainConfig
from kaggle_cifar.device import Policy
from kaggle_cifar.distributed import Replicas
from kaggle_cifar.errors import TrainingDiverged, first_line
from kaggle_cifar.folds import FoldData
from kaggle_cifar.host_augment import HostAugmenter, workers
from kaggle_cifar.inference import DISTINCT_VIEWS, for_inference, stream_probs, view_set_probs
from kaggle_cifar.model import Classifier, for_config, load_pretrained
from kaggle_cifar.optim import build_optimizer
from kaggle_cifar.report import accuracy, nll
from kaggle_cifar.rundir import FoldDir, run_meta

log = logging.getLogger(__name__)

# Held-out images evaluated after each epoch, for the curves and the log; the last epoch (and the
# OOF predictions) take them all. On the CPU a full 25,000-image fold took 16 s of a 57 s epoch.
EPOCH_EVAL_IMAGES = 5_000


def run_seed(cfg: TrainConfig, fold: int, epoch: int | None = None) -> int:
    """The seed of fold `fold`'s initial weights, or of its epoch `epoch` (shuffling and
    augmentation): derived from (seed, fold, epoch), so a resumed run replays exactly what an
    uninterrupted one would, with no RNG state to save."""
    if epoch is None:
        return cfg.seed * 1_000_003 + fold
    return cfg.seed * 1_000_003 + fold * 10_007 + epoch


def initial_model(cfg: TrainConfig, num_classes: int, fold: int, mean: torch.Tensor | None = None,
                  std: torch.Tensor | None = None, images: torch.Tensor | None = None) -> Classifier:
    """Fold `fold`'s starting weights: seeded by (seed, fold), set from the fold's training images
    where the network or --whiten-stem asks for it (whitening), or the --pretrained file's."""
    torch.manual_seed(run_seed(cfg, fold))
    model = for_config(cfg, num_classes, mean, std)
    if images is not None and hasattr(model.network, "init_from_data"):
        model.network.init_from_data(images)
    if images is not None and cfg.whiten_stem:
        model.network.whiten_stem(images)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    return model


def epoch_flips(cfg: TrainConfig, data: FoldData, epoch: int) -> torch.Tensor | None:
    """With --flip alternate, which of the fold's training images epoch `epoch` flips: each image
    draws a side once per fold, then switches every epoch, so that any two epochs in a row show it
    both ways (airbench's alternating flip: more diversity than random flips, which show an image
    the same way twice in a row half the time). None for the other rules."""
    if cfg.flip != "alternate":
        return None
    device = data.train_targets.device
    first = torch.Generator(device=device).manual_seed(run_seed(cfg, data.fold))
    return (torch.rand(len(data.train_targets), device=device, generator=first) < 0.5) ^ bool(epoch % 2)


def augment(images: torch.Tensor, cfg: TrainConfig, generator: torch.Generator,
            flipped: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 NHWC batch in, augmented uint8 NCHW batch out; `flipped`: the batch's rows of epoch_flips."""
    x = flip_crop(images.permute(0, 3, 1, 2), cfg.crop_pad, generator, cfg.flip != "none", flipped, cfg.crop_fill)
    if cfg.auto_augment:
        x = auto_augment(x, cfg.auto_augment, generator)
    return cutout(x, cfg.cutout, generator) if cfg.cutout else x


class Mixing:
    """timm's Mixup and CutMix of the device batch (one draw a batch, timm's "batch" mode), for the
    first `cfg.mixup_epochs` share of the planned steps. timm draws from numpy's global generator;
    here its draws come from a generator of the epoch's own, swapped in around each call, so a
    resumed run replays them and nothing else's draws move. The images are blended in float and
    rounded back to uint8: the model keeps one input dtype (one compiled graph), for a rounding
    under half a grey level. The labels come out as probabilities, which the cross-entropy smooths
    as it smooths hard ones (smoothing is linear: the same as timm's smoothed mixed targets)."""

    def __init__(self, cfg: TrainConfig, num_classes: int):
        self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                           switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=0.0, num_classes=num_classes)
        self.share = cfg.mixup_epochs
        self.state = None

    def epoch(self, seed: int, first_step: int, total_steps: int) -> "Mixing | None":
        """This mixing, seeded for an epoch whose first step is `first_step` of `total_steps`, or
        None if that epoch trains on clean images."""
        if first_step >= self.share * total_steps:
            return None
        self.state = np.random.RandomState(seed).get_state()
        return self

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outer = np.random.get_state()
        np.random.set_state(self.state)
        try:
            mixed, probabilities = self.mixup(images.float(), targets)
        finally:
            self.state = np.random.get_state()
            np.random.set_state(outer)
        return mixed.round_().to(torch.uint8), probabilities


@dataclass
class Training:
    """Everything a training step changes, and what last.pt saves of it."""
    model: Classifier
    replica: torch.nn.Module     # the model, or its DistributedDataParallel wrapper (same parameters)
    step_model: torch.nn.Module  # the replica, or its torch.compile wrapper
    policy: Policy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    criterion: torch.nn.Module
    batch_size: int
    steps_per_epoch: int
    mixing: Mixing | None = None
    replicas: Replicas = Replicas()

    def share(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This replica's rows of a global batch."""
        rows = self.replicas.share(len(images))
        return images[rows], targets[rows]

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's loss and logits, its (scaled) gradients computed. Where the compiled step
        fails (Triton on a GPU it does not support, a driver mismatch, a recompilation), that is said
        once and the fold trains on without compilation; an error of the step itself recurs there."""
        if self.step_model is not self.replica:
            try:
                return self._forward_backward(self.step_model, inputs, targets)
            except Exception as e:  # the compiler's failures have no common type
                log.warning("compiling the training step failed (%s): training without compilation", first_line(e))
                self.step_model = self.replica
        return self._forward_backward(self.replica, inputs, targets)

    def _forward_backward(self, model: torch.nn.Module, inputs: torch.Tensor,
                          targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.policy.autocast():
            logits = model(inputs)
            loss = self.criterion(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss, logits

    def batchnorm_statistics(self) -> list[torch.Tensor]:
        """Every BatchNorm layer's running mean and variance and its batch count."""
        return [b for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]

    @property
    def host_syncs_per_step(self) -> int:
        """What a step waits for the device by design: the fp16 loss scaler reads an unfused
        optimizer's inf flag on the host; a fused one keeps the check on the device."""
        return int(self.scaler.is_enabled() and not self.optimizer.defaults.get("fused"))

    def train_mode(self, features_frozen: bool, whiten_bias_frozen: bool = False) -> None:
        """Training mode for an epoch. With `features_frozen` only the classifier head trains, as in
        feature extraction: every other weight gets no gradient (so the optimizer leaves it as it is)
        and its BatchNorm layers keep their statistics (eval mode). With `whiten_bias_frozen`
        fast_cifar's whitening bias gets none either: its gradient would then be the only one that
        needs the backward pass through the first conv group's input."""
        in_head = {id(p) for p in self.model.head.parameters()}
        whiten = getattr(self.model.network, "whiten", None)
        frozen = {id(whiten.bias)} if whiten_bias_frozen and whiten is not None else set()
        for group in self.optimizer.param_groups:  # the trainable weights; frozen-by-design ones are not here
            for p in group["params"]:
                p.requires_grad_((id(p) in in_head or not features_frozen) and id(p) not in frozen)
        self.model.train(not features_frozen)
        self.model.head.train()

    def use(self, policy: Policy) -> None:
        """Compute as `policy` says from the next step on (a precision measured faster here)."""
        self.policy = policy
        muon = getattr(self.optimizer, "_base_optimizer", self.optimizer)  # inside timm's Lookahead or not
        if hasattr(muon, "newton_schulz_dtype"):
            muon.newton_schulz_dtype = policy.newton_schulz_dtype

    def steps_for(self, epochs: float) -> int:
        return steps_of(epochs, self.steps_per_epoch)

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def steps_of(epochs: float, steps_per_epoch: int) -> int:
    """The steps of `epochs` epochs (a fraction of one: that share of its batches); at least one."""
    return max(1, round(epochs * steps_per_epoch))


def one_cycle(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int,
              done_steps: int = 0) -> torch.optim.lr_scheduler.OneCycleLR:
    """The learning-rate schedule over `total_steps`: linear warm-up to cfg.lr, then the decay to
    1/2500 of it at the last step; positioned after `done_steps` (a re-planned schedule)."""
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup, anneal_strategy=cfg.anneal,
        div_factor=25.0, final_div_factor=100.0, cycle_momentum=False)
    if done_steps:
        scheduler.last_epoch = done_steps - 1
        scheduler.step()
    return scheduler


def build_training(cfg: TrainConfig, data: FoldData, policy: Policy, epochs: float | None = None,
                   backend: str = "inductor", replicas: Replicas = Replicas()) -> Training:
    """A fold's model, optimizer, schedule (over `epochs`, default cfg.epochs), scaler and EMA,
    computed as `policy` says (compiled with `backend` when it compiles training), trained by
    `replicas` together: the batch is the global one, a multiple of their number."""
    model = policy.place(initial_model(cfg, len(data.classes), data.fold, data.mean, data.std, data.train_images))
    optimizer = build_optimizer(cfg, model, policy.newton_schulz_dtype, policy.muon_buckets)
    batch_size = min(cfg.batch_size, len(data.train_targets))
    if cfg.mixes:  # timm's Mixup takes even batches (a fold smaller than one drops an image)
        batch_size -= batch_size % 2
    batch_size -= batch_size % replicas.size  # every replica's share the same size: their mean is the batch's
    steps_per_epoch = len(data.train_targets) // batch_size  # the last partial batch is dropped: fixed shapes
    scheduler = one_cycle(optimizer, cfg, steps_of(epochs or cfg.epochs, steps_per_epoch))
    scaler = torch.amp.GradScaler(policy.device.type, enabled=policy.loss_scaling)
    # Warm-up: the decay grows with the step (1 - (1 + step)^-2/3, capped at ema_decay), so a short
    # run is not an average dominated by the initial weights.
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay > 0 else None
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    replica = replicas.wrap(model, policy.device, unused_parameters=cfg.freeze_epochs > 0)
    step_model = policy.compiled(model, backend, replica) if policy.compile_training else replica
    mixing = Mixing(cfg, len(data.classes)) if cfg.mixes else None
    return Training(model, replica, step_model, policy, optimizer, scheduler, scaler, ema, criterion, batch_size,
                    steps_per_epoch, mixing, replicas)


def train_step(t: Training, inputs: torch.Tensor, targets: torch.Tensor,
               step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step (`step` counts from 1 over the fold). Returns the loss, the logits and
    whether the fp16 loss scaler skipped the step (inf/NaN gradients), all detached and on the
    device: nothing here waits for the device."""
    # An fp16 forward pass that overflows has already moved BatchNorm's running statistics (to
    # inf or NaN) when the scaler skips its step: they are kept to be put back.
    statistics = t.batchnorm_statistics() if t.scaler.is_enabled() else []
    kept = [b.clone() for b in statistics]
    loss, logits = t.forward_backward(inputs, targets)
    t.scaler.step(t.optimizer)
    skipped = (sum(t.scaler._found_inf_per_device(t.optimizer).values()) > 0 if t.scaler.is_enabled()
               else torch.zeros((), dtype=torch.bool, device=inputs.device))
    for now, before in zip(statistics, kept):  # on the device: no sync
        now.copy_(torch.where(skipped, before, now))
    t.scaler.update()
    t.scheduler.step()
    if t.ema is not None:
        t.ema.update(t.model, step=step)
    return loss.detach(), logits.detach(), skipped


def epoch_batches(t: Training, cfg: TrainConfig, data: FoldData, epoch: int, steps: int, generator: torch.Generator,
                  host: HostAugmenter | None, waited: list[float]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's first `steps` augmented batches (inputs, targets) in an order drawn from its
    generator: the fold's device images, or with --albumentations the workers' batches (made while
    the device trains on earlier ones), then the device's augmentation; of each, this replica's
    share. `waited` gets the seconds spent waiting for the workers after their first batch (their
    start-up)."""
    device = data.train_images.device
    order = torch.randperm(len(data.train_targets), device=device, generator=generator)
    batches = order[:t.steps_per_epoch * t.batch_size].view(t.steps_per_epoch, t.batch_size)[:steps]
    flips = epoch_flips(cfg, data, epoch)
    mixing = t.mixing and t.mixing.epoch(run_seed(cfg, data.fold, epoch), epoch * t.steps_per_epoch,
                                         t.scheduler.total_steps)
    host_batches = host.epoch(list(batches.cpu().numpy()), run_seed(cfg, data.fold, epoch)) if host else None
    for step, idx in enumerate(batches):
        if host_batches is None:
            images = data.train_images[idx]
        else:
            t_wait = time.perf_counter()
            images = next(host_batches).to(device, non_blocking=True)
            waited[0] += (time.perf_counter() - t_wait) if step else 0.0
        # Every replica augments (and mixes) the whole batch, then takes its share: each draws what one
        # process would, so they train on one process's batch. The augmentation is a few batched ops.
        images, targets = augment(images, cfg, generator, None if flips is None else flips[idx]), data.train_targets[idx]
        yield t.share(*(mixing(images, targets) if mixing else (images, targets)))


def train_one_epoch(t: Training, cfg: TrainConfig, data: FoldData, epoch: int, bar: tqdm,
                    host: HostAugmenter | None = None, steps: int | None = None) -> dict:
    """One pass over the fold's training images (its first `steps` batches: a last, partial
    epoch), its randomness drawn from the epoch's own generator (seeded by (seed, fold, epoch): a
    resumed run replays it)."""
    steps = steps or t.steps_per_epoch
    t0 = time.perf_counter()
    t.train_mode(features_frozen=epoch < cfg.freeze_epochs, whiten_bias_frozen=0 < cfg.whiten_bias_epochs <= epoch)
    device = data.train_images.device
    generator = torch.Generator(device=device).manual_seed(run_seed(cfg, data.fold, epoch))
    # Summed on the device, no host sync per step. A step the loss scaler skipped (one overflow in
    # fp16) changed no weight, so its loss is left out of the epoch's mean rather than making it inf.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    skipped = torch.zeros((), device=device, dtype=torch.long)
    waited = [0.0]
    for step, (inputs, targets) in enumerate(epoch_batches(t, cfg, data, epoch, steps, generator, host, waited)):
        lr = t.scheduler.get_last_lr()[0]  # the rate this step uses: the log's "lr" is the epoch's last
        loss, logits, step_skipped = train_step(t, inputs, targets, epoch * t.steps_per_epoch + step + 1)
        loss_sum += torch.where(step_skipped, 0.0, loss * len(targets))
        labels = targets.argmax(1) if targets.ndim > 1 else targets  # a mixed batch: each image's larger share
        correct += torch.where(step_skipped, 0, (logits.argmax(1) == labels).sum())
        skipped += step_skipped
        bar.update(t.batch_size)
    if hasattr(t.optimizer, "sync_lookahead"):  # Lookahead's slow weights end the epoch: evaluated, saved, resumed from
        t.optimizer.sync_lookahead()
    # The one sync of the epoch, summed over the replicas; each skips the same steps (the scaler checks
    # the averaged gradients).
    loss_sum, correct, skipped = t.replicas.total(torch.stack([loss_sum, correct.float(), skipped.float()])).tolist()
    skipped /= t.replicas.size
    stepped = (steps - int(skipped)) * t.batch_size  # no step taken: NaN, and the fold stops
    seconds = time.perf_counter() - t0
    metrics = {"train_loss": loss_sum / stepped if stepped else math.nan,
               "train_acc": correct / stepped if stepped else math.nan, "lr": lr,
               "train_images_per_s": steps * t.batch_size / seconds, "skipped_steps": int(skipped)}
    if host is not None:
        metrics["augment_wait_s"] = waited[0]
        if waited[0] > 0.2 * seconds:
            log.warning("fold %d, epoch %d: training waited %.1f s of %.1f s for albumentations' %d worker processes: "
                        "augmentation, not the model, is the bottleneck (a lighter pipeline or more CPU cores)",
                        data.fold, epoch + 1, waited[0], seconds, workers())
    return metrics


def evaluate(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, policy: Policy,
             batch_size: int = PREDICT_BATCH) -> dict:
    """Loss and accuracy on held-out images, without test-time views (NaN without any: a full fit
    with no holdout)."""
    if not len(images):
        return {"val_loss": math.nan, "val_acc": math.nan}
    model.eval()
    probs = stream_probs([model], images, TTA_VIEWS["none"], policy, batch_size).cpu().numpy()
    targets = targets.cpu().numpy()
    return {"val_loss": nll(probs, targets), "val_acc": accuracy(probs, targets)}


def log_and_checkpoint(fold_dir: FoldDir, t: Training, meta: dict, epoch: int, history: list[dict], board,
                       plan, background: checkpoint.Background | None = None) -> None:
    """The epoch's resume state (atomically: a kill leaves the previous one; with `background`,
    written while the next epoch trains), its log row with the time the training waited for it
    (outside the epoch's "seconds"), its TensorBoard scalars."""
    t0 = time.perf_counter()
    planned = {"plan": plan.state_dict()} if plan is not None else {}
    fold_dir.save_last({"meta": meta, "epoch": epoch, "history": history, **planned, **t.state_dict()}, background)
    history[-1]["checkpoint_seconds"] = time.perf_counter() - t0  # in last.pt from the next epoch's save on
    fold_dir.write_log(history)
    if board is not None:
        for name, value in history[-1].items():
            if isinstance(value, (int, float)):  # not the precision's name
                board.add_scalar(name, value, epoch + 1)
        board.flush()


def finish(fold_dir: FoldDir, cfg: TrainConfig, data: FoldData, t: Training, meta: dict, history: list[dict],
           plan) -> dict:
    """The final model, the fold's OOF probabilities (the run's TTA), the holdout's (every view
    set; a full fit's held-out images are its holdout, so both), and result.json last: from then on
    the fold counts as finished. A full fit without a holdout has no held-out image: its accuracy
    is None."""
    model, policy = t.eval_model.eval(), t.policy
    fold_dir.write_log(history)  # (again: a fold finished anew from its last checkpoint gets its log back)
    fold_dir.save_model(meta, model.state_dict())
    forwards = len(DISTINCT_VIEWS) * (len(data.val_images) + len(data.holdout_images))
    models = for_inference([model], policy, forwards, cfg.predict_batch)
    oof_by_tta = {name: p.cpu().numpy() for name, p in view_set_probs(
        models, data.val_images, policy, cfg.predict_batch, f"fold {data.fold}: held-out images, every view").items()} \
        if len(data.val_images) else {}
    if oof_by_tta:
        fold_dir.write_oof(oof_by_tta[cfg.tta])
    if len(data.holdout_images):
        fold_dir.write_holdout({name: p.cpu().numpy() for name, p in view_set_probs(
            models, data.holdout_images, policy, cfg.predict_batch, f"fold {data.fold}: holdout, every view").items()})
    elif cfg.full_fit and oof_by_tta:  # its held-out images are the holdout: kept as a k-fold run keeps its holdout's
        fold_dir.write_holdout(oof_by_tta)
    targets = data.val_targets.cpu().numpy()
    accuracy_by_tta = {name: accuracy(p, targets) for name, p in oof_by_tta.items()}
    result = {"fold": data.fold, "accuracy": accuracy_by_tta.get(cfg.tta), "accuracy_by_tta": accuracy_by_tta,
              "train_images": len(data.train_targets),
              "epochs": round(sum(h.get("steps", t.steps_per_epoch) for h in history) / t.steps_per_epoch, 2),
              "seconds": sum(h["seconds"] for h in history),
              "precision": " then ".join(dict.fromkeys(h.get("precision", t.policy.precision) for h in history))}
    if plan is not None:
        result["plan"] = plan.state_dict()
    fold_dir.write_result(result)
    if result["accuracy"] is not None:
        log.info("fold %d: held-out accuracy %.4f (TTA %s)", data.fold, result["accuracy"], cfg.tta)
    return result


def resume(t: Training, fold_dir: FoldDir, meta: dict, plan, fold: int) -> list[dict]:
    """The fold's log rows so far, with `t` (and the plan) as its last checkpoint left them;
    nothing for a fold that has not started."""
    if not fold_dir.last.exists():
        return []
    state = fold_dir.load_last(meta, t.policy.device)
    if plan is not None and "plan" in state:
        plan.load_state_dict(state["plan"])
    t.load_state_dict(state)  # the schedule too, as last planned
    log.info("fold %d: resuming after epoch %d from %s", fold, state["epoch"] + 1, fold_dir.last)
    return state["history"][:state["epoch"] + 1]


def epoch_row(t: Training, cfg: TrainConfig, data: FoldData, fold_dir: FoldDir, epoch: int, steps: int, last: bool,
              bar: tqdm, host: HostAugmenter | None) -> dict:
    """Train `steps` steps of epoch `epoch` and evaluate them (on EPOCH_EVAL_IMAGES held-out
    images, all of them on the `last` epoch): its log row. A non-finite loss stops the fold."""
    t0 = time.perf_counter()
    metrics = train_one_epoch(t, cfg, data, epoch, bar, host, steps)
    if not math.isfinite(metrics["train_loss"]):
        kept = f"last good checkpoint kept: {fold_dir.last}" if fold_dir.last.exists() else "no checkpoint was written"
        raise TrainingDiverged(f"fold {data.fold}, epoch {epoch + 1}: training loss is {metrics['train_loss']}; "
                               f"{kept} (try a lower --lr)")
    evaluated = len(data.val_targets) if last else EPOCH_EVAL_IMAGES
    t_eval = time.perf_counter()
    metrics |= evaluate(t.eval_model, data.val_images[:evaluated], data.val_targets[:evaluated], t.policy,
                        cfg.predict_batch)
    metrics["eval_seconds"] = time.perf_counter() - t_eval
    bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", val_acc=f"{metrics['val_acc']:.4f}")
    return {"epoch": epoch + 1, "train_loss": metrics["train_loss"], "train_acc": metrics["train_acc"],
            "val_loss": metrics["val_loss"], "val_acc": metrics["val_acc"],
            "val_images": min(evaluated, len(data.val_targets)), "lr": metrics["lr"],
            "seconds": time.perf_counter() - t0, "train_images_per_s": metrics["train_images_per_s"],
            "skipped_steps": metrics["skipped_steps"], "steps": steps, "eval_seconds": metrics["eval_seconds"],
            "precision": t.policy.precision, **{k: metrics[k] for k in ("augment_wait_s",) if k in metrics}}


class Progress:
    """One progress bar over the folds a process trains: folds done, the one training, and so the
    time to the end of the run. Its total is the images still planned, and changes only with the
    plan (a fold's own count replaces the estimate made for it when it starts)."""

    def __init__(self, planned: dict[int, int], shown: bool = True):
        self.planned, self.finished = dict(planned), 0  # fold -> images it trains
        self.bar = tqdm(total=sum(self.planned.values()), unit="img", unit_scale=True, desc="training",
                        disable=not shown)

    def start(self, fold: int, planned: int, trained: int) -> None:
        self.planned[fold] = planned
        self.bar.total = sum(self.planned.values())
        self.bar.update(trained)
        self.bar.set_description(f"fold {fold} ({self.finished} of {len(self.planned)} done)")

    def replanned(self, fold: int, planned: int) -> None:
        """This fold and the ones after it train `planned` images each now."""
        later = [k for k in self.planned if k >= fold]
        self.planned |= {k: planned for k in later}
        self.bar.total = sum(self.planned.values())

    def fold_finished(self) -> None:
        self.finished += 1

    def close(self) -> None:
        self.bar.close()


def train_fold(cfg: TrainConfig, data: FoldData, fold_dir: FoldDir, policy: Policy, plan=None,
               epoch_end: Callable[[list[dict]], None] | None = None, progress: Progress | None = None,
               precision=None, replicas: Replicas = Replicas()) -> dict | None:
    """Train (or resume, or skip if finished) one fold; return its result. With a `plan` (the
    run's budget.Plan) the fold trains the plan's epochs, which it may change at an epoch end (the
    schedule is then stretched or compressed to the new end, never cut short), instead of
    cfg.epochs. `epoch_end` sees the log rows after each epoch's checkpoint (a resumed fold's
    first) and may stop the fold by raising, as a search's pruner does. `progress` is the run's
    bar (default: one of the fold's own). `precision` (the run's budget.PrecisionWatch) may change
    the policy at an epoch end to a precision measured faster. With `replicas` the fold trains on
    several ranks together, in step: the first one's clock re-plans for all, it alone writes the
    fold's files and returns the result (the others None)."""
    if fold_dir.finished():
        return fold_dir.read_result()
    meta = run_meta(cfg, data.classes)
    t = build_training(cfg, data, policy, epochs=plan.epochs if plan is not None else None, replicas=replicas)
    history = resume(t, fold_dir, meta, plan, data.fold)
    if history and epoch_end is not None:
        epoch_end(history)
    host = HostAugmenter(cfg.albumentations, data.train_images.cpu(), policy.device.type == "cuda", t.batch_size) \
        if cfg.albumentations else None
    steps = t.steps_for(plan.epochs if plan is not None else cfg.epochs)
    own = progress is None
    progress = progress or Progress({data.fold: 0})
    progress.start(data.fold, steps * t.batch_size, len(history) * t.steps_per_epoch * t.batch_size)
    background = checkpoint.Background()
    try:
        with tensorboard_writer(fold_dir) if replicas.writes else contextlib.nullcontext(None) as board:
            while (done := len(history) * t.steps_per_epoch) < steps:  # every epoch but the last is whole
                epoch, now = len(history), min(t.steps_per_epoch, steps - done)
                history.append(epoch_row(t, cfg, data, fold_dir, epoch, now, done + now == steps, progress.bar, host))
                replanned = plan is not None and done + now < steps and plan.after_epoch(epoch + 1, data.fold)
                if plan is not None:  # the first replica's clock re-plans for all of them
                    replanned, plan.epochs = replicas.first((replanned, plan.epochs))
                if replanned:
                    steps = max(done + now + 1, t.steps_for(plan.epochs))
                    t.scheduler = one_cycle(t.optimizer, cfg, steps, done + now)
                    progress.replanned(data.fold, steps * t.batch_size)
                # Replicas keep the precision they started in: measured apart, their speeds could choose apart.
                if precision is not None and replicas.size == 1 and done + now < steps \
                        and precision.after_epoch(cfg, data, history[-1]):
                    t.use(precision.policy)
                    if plan is not None:
                        plan.speed_changed()
                if replicas.writes:
                    log_and_checkpoint(fold_dir, t, meta, epoch, history, board, plan, background)
                if epoch_end is not None:
                    epoch_end(history)
        background.wait()  # the last checkpoint on disk, or its error, before the fold can count as finished
        result = finish(fold_dir, cfg, data, t, meta, history, plan) if replicas.writes else None
    finally:
        background.wait(raising=False)  # interrupted: the checkpoint handed over still completes
        if own:
            progress.close()
    progress.fold_finished()
    return result


def tensorboard_writer(fold_dir: FoldDir):
    """A context manager giving a TensorBoard writer into the fold's tensorboard/ folder, or None
    when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return contextlib.nullcontext(None)
    return SummaryWriter(str(fold_dir.tensorboard))
