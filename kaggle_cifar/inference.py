"""Class probabilities of uint8 NHWC images under one or more models and test-time views, named in
the order they compose: one device batch (`batch_probs`) -> a whole image set streamed to the device
in chunks (`stream_probs`) -> every TTA view set at once (`view_set_probs`). Ensembles over runs and
the submission are built on these in predict.py; a finished fold's model is loaded here, and
compiled for a large image set (`for_inference`)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from kaggle_cifar import budget, checkpoint
from kaggle_cifar.augment import TTA_VIEWS, tta_view
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.device import autocast, place, synchronize, to_device
from kaggle_cifar.errors import first_line
from kaggle_cifar.rundir import RunDir

log = logging.getLogger(__name__)

CHUNK = 65_536  # images moved to the device at once (200 MB of 32x32 uint8)
PREDICT_BATCH = 2048  # images per forward pass, predict's --batch-size default
# On a 2-core CPU compiling a model for inference took 10-17 s and its forward pass then ran about
# 1.4x eager's (bench/RESULTS.md): that repays itself after some tens of thousands of images, so sets
# this large (a test set, a full-data fold's OOF and holdout views) are compiled, smaller ones not.
COMPILE_MIN_FORWARDS = 100_000


class FrozenForward(torch.nn.Module):
    """`model`'s forward pass compiled by inductor with the weights frozen into the graph as
    constants (BatchNorm folded into the convolutions, oneDNN's weights packed once), so only for a
    model that no longer trains. Full batches of `batch_size` go in channels_last, so that one graph
    serves a whole image set and its views; a shorter batch (an image set's last) runs on the model
    as it is, cheaper than compiling a second graph or padding it. Where the first compilation
    fails (no C++ compiler on the machine, a GPU Triton does not support), it says so and runs the
    model as it is."""

    def __init__(self, model: torch.nn.Module, batch_size: int):
        super().__init__()
        self.model, self.batch_size = model, batch_size
        self.compiled = torch.compile(model, options={"freezing": True}, dynamic=False)
        self.proven = False  # compiled and run once: from then on its errors are real ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None or len(x) != self.batch_size:
            return self.model(x)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.proven:
            return self.compiled(x)
        try:
            out = self.compiled(x)
        except Exception as e:  # the compiler's failures have no common type
            log.warning("compiling the model for inference failed (%s): predicting without compilation",
                        first_line(e))
            self.compiled = None
            return self.model(x)
        self.proven = True
        return out


def for_inference(models: list[torch.nn.Module], device: torch.device, forwards: int, batch_size: int,
                  compile: bool | None = None) -> list[torch.nn.Module]:
    """The models (in eval mode) to predict `forwards` image views each with, at `batch_size`:
    compiled (FrozenForward) when `compile` says so, or by default on the CPU when the set is large
    enough to repay the compilation; as they are otherwise. GPUs predict eagerly by default: not
    measured there."""
    if compile is None:
        compile = device.type == "cpu" and forwards >= COMPILE_MIN_FORWARDS
    return [FrozenForward(model, batch_size).eval() for model in models] if compile else models


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
                 batch_size: int = PREDICT_BATCH, desc: str | None = None) -> torch.Tensor:
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


def forward_seconds(models: list[torch.nn.Module], images: torch.Tensor, device: torch.device,
                    batch_size: int = PREDICT_BATCH) -> float:
    """Seconds per image of stream_probs over `images` (one view), after a warm-up batch that pays
    for any compilation; timed on budget.clock, as the time budget's plans are."""
    stream_probs(models, images[:batch_size], TTA_VIEWS["none"], device, batch_size)
    synchronize(device)
    t0 = budget.clock()
    stream_probs(models, images, TTA_VIEWS["none"], device, batch_size)
    synchronize(device)
    return (budget.clock() - t0) / max(1, len(images))


DISTINCT_VIEWS = list(dict.fromkeys(view for view_set in TTA_VIEWS.values() for view in view_set))


def view_set_probs(models: list[torch.nn.Module], images: torch.Tensor, device: torch.device,
                   batch_size: int = PREDICT_BATCH) -> dict[str, torch.Tensor]:
    """stream_probs for every view set in TTA_VIEWS, each distinct view predicted once."""
    per_view = {view: stream_probs(models, images, [view], device, batch_size) for view in DISTINCT_VIEWS}
    return {name: torch.stack([per_view[view] for view in view_set]).mean(0) for name, view_set in TTA_VIEWS.items()}


def load_fold_model(run: RunDir, cfg: TrainConfig, classes: list[str], fold: int,
                    device: torch.device) -> torch.nn.Module:
    """A finished fold's model on `device`, in eval mode (read on the CPU, moved once)."""
    model = cfg.build_model(len(classes))
    model.load_state_dict(run.fold(fold).load_model(checkpoint.run_meta(cfg, classes)))
    return place(model, device).eval()


def load_fold_models(run: RunDir, cfg: TrainConfig, classes: list[str], device: torch.device) -> list[torch.nn.Module]:
    return [load_fold_model(run, cfg, classes, fold, device) for fold in range(cfg.folds)]
