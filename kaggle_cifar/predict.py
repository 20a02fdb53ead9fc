"""Predict with test-time augmentation and the fold ensemble: probabilities averaged over views and
folds. The test cache is streamed to the device in large chunks; every fold model stays resident,
so each chunk crosses the bus once."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kaggle_cifar import checkpoint, distributed
from kaggle_cifar.augment import TTA_VIEWS, tta_view
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.model import autocast_dtype, build_model

log = logging.getLogger(__name__)

CHUNK = 65_536  # images moved to the device at once (200 MB of 32x32 uint8)


@torch.no_grad()
def predict_probs(models: list[torch.nn.Module], images: np.ndarray | torch.Tensor, views: list, device: torch.device,
                  batch_size: int = 2048, desc: str | None = None) -> torch.Tensor:
    """Mean softmax over models x views of uint8 NHWC `images` (host array or device tensor): (N, C) float32."""
    for m in models:
        m.eval()
    amp_dtype = autocast_dtype(device)
    out = None
    with tqdm(total=len(images), desc=desc, unit="img", unit_scale=True, disable=desc is None) as bar:
        for start in range(0, len(images), CHUNK):
            chunk = images[start:start + CHUNK]
            if isinstance(chunk, np.ndarray):
                chunk = torch.from_numpy(np.array(chunk))  # a writable copy of the memory-mapped rows
            chunk = chunk.to(device, non_blocking=True).permute(0, 3, 1, 2)
            for b in range(0, len(chunk), batch_size):
                x = chunk[b:b + batch_size]
                probs = 0
                for model in models:
                    for view in views:
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            logits = model(tta_view(x, view))
                        probs = probs + logits.float().softmax(1)
                probs = probs / (len(models) * len(views))
                if out is None:
                    out = torch.empty((len(images), probs.shape[1]), dtype=torch.float32, device=device)
                out[start + b:start + b + len(x)] = probs
                bar.update(len(x))
    return out


def probs_per_tta(models: list[torch.nn.Module], images: torch.Tensor, device: torch.device,
                  batch_size: int = 2048) -> dict[str, torch.Tensor]:
    """predict_probs for every view set in TTA_VIEWS, each distinct view predicted once."""
    views = list(dict.fromkeys(view for view_set in TTA_VIEWS.values() for view in view_set))
    per_view = {view: predict_probs(models, images, [view], device, batch_size) for view in views}
    return {name: torch.stack([per_view[view] for view in view_set]).mean(0) for name, view_set in TTA_VIEWS.items()}


def load_fold_model(run_dir: Path, cfg: TrainConfig, classes: list[str], fold: int, image_shape: tuple,
                    device: torch.device) -> torch.nn.Module:
    """A finished fold's model; an unfinished fold is an error, never a silently smaller ensemble."""
    path = Path(run_dir) / f"fold{fold}" / "model.pt"
    if not path.exists():
        raise checkpoint.CheckpointError(f"{path}: missing; fold {fold} has not finished (run train_folds.py)")
    state = checkpoint.load(path, checkpoint.run_meta(cfg, classes), device)
    # mean/std are placeholders: the state dict carries the real buffers.
    model = build_model(cfg.arch, len(classes), cfg.width, torch.zeros(image_shape[-1]), torch.ones(image_shape[-1]))
    model.load_state_dict(state["model"])
    return model.to(device, memory_format=torch.channels_last)


def load_fold_models(run_dir: Path, cfg: TrainConfig, classes: list[str], image_shape: tuple,
                     device: torch.device) -> list[torch.nn.Module]:
    return [load_fold_model(run_dir, cfg, classes, fold, image_shape, device) for fold in range(cfg.folds)]


def predict_test(images: np.ndarray, models: list[torch.nn.Module], tta: str, ctx: distributed.Context,
                 batch_size: int = 2048) -> np.ndarray:
    """Ensemble probabilities for every test image; each rank predicts its shard, all gather."""
    views = TTA_VIEWS[tta]
    rows = distributed.shard(len(images), ctx)
    t0 = time.perf_counter()
    local = predict_probs(models, images[rows], views, ctx.device, batch_size, desc=f"predict rank {ctx.rank}")
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n_local = rows.stop - rows.start
    log.info("rank %d: %d images x %d views x %d folds in %.1fs (%.0f images/s per view and fold)",
             ctx.rank, n_local, len(views), len(models), seconds, n_local * len(views) * len(models) / seconds)
    return distributed.gather_rows(local, len(images), ctx).cpu().numpy()
