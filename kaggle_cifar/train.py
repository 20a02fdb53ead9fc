"""Train one fold: the whole loop, top to bottom, with per-epoch atomic checkpoints and resume.

Fold directory contents:
  last.pt      everything needed to resume (weights, EMA, optimizer, schedule, scaler, epoch, log)
  log.csv      one row per epoch: train/val loss and accuracy, learning rate, time, images/s
  tensorboard/ the same metrics for TensorBoard, when it is installed
  model.pt     final weights (the EMA's when enabled) and the meta predict checks
  oof.npy      class probabilities (with the run's TTA) for the fold's held-out images
  holdout.npz  with --holdout: class probabilities for the holdout images, one array per TTA view set
  result.json  written last (held-out accuracy with each TTA view set): the fold is finished and is
               skipped on a re-run
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from kaggle_cifar import checkpoint
from kaggle_cifar.atomic import atomic_path, write_text
from kaggle_cifar.augment import TTA_VIEWS, auto_augment, cutout, flip_crop
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.model import autocast_dtype, build_model, load_pretrained
from kaggle_cifar.predict import predict_probs, probs_per_tta

log = logging.getLogger(__name__)


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class FoldData:
    """One fold's split of the training images, already on the training device as uint8 NHWC.
    The holdout images (empty without --holdout) are in no fold's training or validation set."""
    fold: int
    train_images: torch.Tensor
    train_targets: torch.Tensor
    val_images: torch.Tensor
    val_targets: torch.Tensor
    holdout_images: torch.Tensor


def epoch_generator(cfg: TrainConfig, fold: int, epoch: int, device: torch.device) -> torch.Generator:
    """Shuffling and augmentation randomness of one epoch, derived from (seed, fold, epoch) so that
    a resumed run replays exactly what an uninterrupted one would, with no RNG state to save."""
    return torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + fold * 10_007 + epoch)


def initial_model(cfg: TrainConfig, num_classes: int, fold: int, mean: torch.Tensor, std: torch.Tensor):
    """Fold `fold`'s starting weights: seeded by (seed, fold), or the --pretrained file's."""
    torch.manual_seed(cfg.seed * 1_000_003 + fold)
    model = build_model(cfg.arch, num_classes, cfg.width, mean, std)
    if cfg.pretrained:
        load_pretrained(model, Path(cfg.pretrained))
    return model


def augment(images: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """uint8 NHWC batch in, augmented uint8 NCHW batch out."""
    x = flip_crop(images.permute(0, 3, 1, 2), cfg.crop_pad, generator)
    if cfg.auto_augment:
        x = auto_augment(x, cfg.auto_augment, generator)
    return cutout(x, cfg.cutout, generator) if cfg.cutout else x


def train_fold(cfg: TrainConfig, data: FoldData, classes: list[str], mean: torch.Tensor, std: torch.Tensor,
               fold_dir: Path, device: torch.device, compile: bool = False) -> dict:
    """Train (or resume, or skip if finished) one fold; return its result."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    result_path, last_path = fold_dir / "result.json", fold_dir / "last.pt"
    if fold_finished(fold_dir):
        return json.loads(result_path.read_text())
    meta = checkpoint.run_meta(cfg, classes)

    model = initial_model(cfg, len(classes), data.fold, mean, std).to(device, memory_format=torch.channels_last)
    # timm's factory ("sgd" is Nesterov SGD); it keeps BatchNorm weights and biases out of the decay.
    optimizer = create_optimizer_v2(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, filter_bias_and_bn=not cfg.decay_norm_and_bias)
    n_train = len(data.train_targets)
    batch_size = min(cfg.batch_size, n_train)
    steps_per_epoch = n_train // batch_size  # drop the last partial batch: fixed shapes for torch.compile
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=cfg.warmup,
        anneal_strategy=cfg.anneal, div_factor=25.0, final_div_factor=100.0, cycle_momentum=False)
    amp_dtype = autocast_dtype(device)  # fp16 needs loss scaling, bf16 does not
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # Warm-up: the decay grows with the step (1 - (1 + step)^-2/3, capped at ema_decay), so a short
    # run is not an average dominated by the initial weights.
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay > 0 else None
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    step_model = torch.compile(model) if compile else model

    start_epoch, history = 0, []
    if last_path.exists():
        state = checkpoint.load(last_path, meta, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        log.info("fold %d: resuming after epoch %d from %s", data.fold, start_epoch, last_path)

    eval_model = ema.module if ema is not None else model
    # Both close on any exit, a divergence included.
    with tqdm(total=cfg.epochs * steps_per_epoch * batch_size, initial=start_epoch * steps_per_epoch * batch_size,
              desc=f"fold {data.fold}", unit="img", unit_scale=True) as bar, tensorboard_writer(fold_dir) as board:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            generator = epoch_generator(cfg, data.fold, epoch, device)
            order = torch.randperm(n_train, device=device, generator=generator)
            loss_sum = torch.zeros((), device=device)  # accumulated on the device: no host sync per step
            correct = torch.zeros((), device=device, dtype=torch.long)
            for step in range(steps_per_epoch):
                idx = order[step * batch_size:(step + 1) * batch_size]
                inputs, targets = augment(data.train_images[idx], cfg, generator), data.train_targets[idx]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = step_model(inputs)
                    loss = criterion(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step_lr = scheduler.get_last_lr()[0]  # the rate this step used (the log's "lr")
                scheduler.step()
                if ema is not None:
                    ema.update(model, step=epoch * steps_per_epoch + step + 1)
                loss_sum += loss.detach() * batch_size
                correct += (logits.argmax(1) == targets).sum()
                bar.update(batch_size)
            seen = steps_per_epoch * batch_size
            train_loss = loss_sum.item() / seen  # the one sync of the epoch
            if not math.isfinite(train_loss):
                kept = f"last good checkpoint kept: {last_path}" if last_path.exists() else "no checkpoint was written"
                raise TrainingDiverged(f"fold {data.fold}, epoch {epoch + 1}: training loss is {train_loss}; "
                                       f"{kept} (try a lower --lr)")
            train_seconds = time.perf_counter() - t0
            val_probs = predict_probs([eval_model], data.val_images, TTA_VIEWS["none"], device)
            val_loss, val_acc = nll_and_accuracy(val_probs, data.val_targets)
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "train_acc": correct.item() / seen,
                            "val_loss": val_loss, "val_acc": val_acc, "lr": step_lr,
                            "seconds": time.perf_counter() - t0, "train_images_per_s": seen / train_seconds})
            bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val_acc:.4f}")
            checkpoint.save(last_path, {
                "meta": meta, "epoch": epoch, "history": history, "model": model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()})
            write_text(fold_dir / "log.csv", pd.DataFrame(history).to_csv(index=False))
            if board is not None:
                for name, value in history[-1].items():
                    board.add_scalar(name, value, epoch + 1)
                board.flush()

    checkpoint.save(fold_dir / "model.pt", {"meta": meta, "model": eval_model.state_dict()})
    oof_by_tta = probs_per_tta([eval_model], data.val_images, device)
    with atomic_path(fold_dir / "oof.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, oof_by_tta[cfg.tta].cpu().numpy())
    if len(data.holdout_images):
        holdout_probs = probs_per_tta([eval_model], data.holdout_images, device)
        with atomic_path(fold_dir / "holdout.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **{name: p.cpu().numpy() for name, p in holdout_probs.items()})
    accuracy_by_tta = {name: nll_and_accuracy(p, data.val_targets)[1] for name, p in oof_by_tta.items()}
    accuracy = accuracy_by_tta[cfg.tta]
    result = {"fold": data.fold, "accuracy": accuracy, "accuracy_by_tta": accuracy_by_tta, "train_images": n_train,
              "epochs": cfg.epochs, "seconds": sum(h["seconds"] for h in history)}
    write_text(result_path, json.dumps(result, indent=2) + "\n")
    log.info("fold %d: held-out accuracy %.4f (TTA %s)", data.fold, accuracy, cfg.tta)
    return result


def fold_finished(fold_dir: Path) -> bool:
    return (fold_dir / "result.json").exists()


def tensorboard_writer(fold_dir: Path):
    """A context manager giving a TensorBoard writer into FOLD_DIR/tensorboard, or None when
    tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return contextlib.nullcontext(None)
    return SummaryWriter(str(fold_dir / "tensorboard"))


def nll_and_accuracy(probs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    targets = targets.to(probs.device)
    nll = -probs.gather(1, targets[:, None]).clamp_min(1e-12).log().mean()
    return nll.item(), (probs.argmax(1) == targets).float().mean().item()
