"""Class probabilities of uint8 NHWC images under one or more models and test-time views, named in
the order they compose: one device batch (`batch_probs`) -> a whole image set streamed to the device
in chunks (`stream_probs`) -> every TTA view set at once (`view_set_probs`). Ensembles over runs and
the submission are built on these in predict.py; a finished fold's model is loaded here."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from kaggle_cifar import checkpoint
from kaggle_cifar.augment import TTA_VIEWS, tta_view
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.device import autocast, place, to_device
from kaggle_cifar.rundir import RunDir

CHUNK = 65_536  # images moved to the device at once (200 MB of 32x32 uint8)


def batch_probs(models: list[torch.nn.Module], batch: torch.Tensor, views: list) -> torch.Tensor:
    """Mean softmax over models x views of one uint8 NCHW batch on the models' device: (B, C) float32."""
    probs = 0
    for model in models:
        for view in views:
            with autocast(batch.device):
                logits = model(tta_view(batch, view))
            probs = probs + logits.float().softmax(1)
    return probs / (len(models) * len(views))


@torch.no_grad()
def stream_probs(models: list[torch.nn.Module], images: np.ndarray | torch.Tensor, views: list, device: torch.device,
                 batch_size: int = 2048, desc: str | None = None) -> torch.Tensor:
    """batch_probs of every image of a host array or device tensor, streamed in chunks: (N, C) on `device`.
    The models must be in eval mode (BatchNorm's running statistics, no dropout)."""
    training = [type(m).__name__ for m in models if m.training]
    if training:
        raise ValueError(f"stream_probs needs models in eval mode; call .eval() on {', '.join(training)} first")
    out = None
    with tqdm(total=len(images), desc=desc, unit="img", unit_scale=True, disable=desc is None) as bar:
        for start in range(0, len(images), CHUNK):
            chunk = images[start:start + CHUNK]
            chunk = (to_device(chunk, device) if isinstance(chunk, np.ndarray) else chunk.to(device)).permute(0, 3, 1, 2)
            for b in range(0, len(chunk), batch_size):
                probs = batch_probs(models, chunk[b:b + batch_size], views)
                if out is None:
                    out = torch.empty((len(images), probs.shape[1]), dtype=torch.float32, device=device)
                out[start + b:start + b + len(probs)] = probs
                bar.update(len(probs))
    return out


def view_set_probs(models: list[torch.nn.Module], images: torch.Tensor, device: torch.device,
                   batch_size: int = 2048) -> dict[str, torch.Tensor]:
    """stream_probs for every view set in TTA_VIEWS, each distinct view predicted once."""
    views = list(dict.fromkeys(view for view_set in TTA_VIEWS.values() for view in view_set))
    per_view = {view: stream_probs(models, images, [view], device, batch_size) for view in views}
    return {name: torch.stack([per_view[view] for view in view_set]).mean(0) for name, view_set in TTA_VIEWS.items()}


def load_fold_model(run: RunDir, cfg: TrainConfig, classes: list[str], fold: int,
                    device: torch.device) -> torch.nn.Module:
    """A finished fold's model on `device`, in eval mode (read on the CPU, moved once)."""
    model = cfg.build_model(len(classes))
    model.load_state_dict(run.fold(fold).load_model(checkpoint.run_meta(cfg, classes)))
    return place(model, device).eval()


def load_fold_models(run: RunDir, cfg: TrainConfig, classes: list[str], device: torch.device) -> list[torch.nn.Module]:
    return [load_fold_model(run, cfg, classes, fold, device) for fold in range(cfg.folds)]
