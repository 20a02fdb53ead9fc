"""Class probabilities of uint8 NHWC images under one or more models and test-time views, named in
the order they compose: one device batch (`batch_probs`) -> a whole image set streamed to the device
in chunks (`stream_probs`) -> every TTA view set at once (`view_set_probs`), or a view set's views
each only where the ones before it leave an image unsure (`gated_probs`). Ensembles over runs and
the submission are built on these in predict.py; a finished fold's model is loaded here, and
compiled where the device policy says (`for_inference`)."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from kaggle_cifar.augment import TTA_VIEWS, tta_view
from kaggle_cifar.config import PREDICT_BATCH, TrainConfig
from kaggle_cifar.device import Policy, to_device
from kaggle_cifar.errors import first_line
from kaggle_cifar.model import Classifier, for_config
from kaggle_cifar.rundir import RunDir, run_meta

log = logging.getLogger(__name__)

CHUNK = 65_536  # images moved to the device at once (200 MB of 32x32 uint8)


class FrozenForward(torch.nn.Module):
    """`model`'s forward pass compiled by inductor with the weights frozen into the graph as
    constants (BatchNorm folded into the convolutions, oneDNN's weights packed once), so only for a
    model that no longer trains. Full batches of `batch_size` go in channels_last, so that one graph
    serves a whole image set and its views; a shorter batch (an image set's last) runs on the model
    as it is, cheaper than compiling a second graph or padding it. Where the first compilation
    fails (no C++ compiler on the machine, a GPU Triton does not support), it says so and runs the
    model as it is."""

    def __init__(self, model: Classifier, batch_size: int, policy: Policy):
        super().__init__()
        self.model, self.batch_size = model, batch_size
        self.compiled = policy.compiled(model, options={"freezing": True}, dynamic=False)
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


def for_inference(models: list[Classifier], policy: Policy, forwards: int, batch_size: int) -> list[torch.nn.Module]:
    """The models (in eval mode) to predict `forwards` image views each with, at `batch_size`:
    compiled (FrozenForward) where the policy compiles a set that large, as they are otherwise."""
    if not policy.compiles_inference(forwards):
        return models
    return [FrozenForward(model, batch_size, policy).eval() for model in models]


def with_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class probabilities (N, C) recalibrated by a temperature, softmax(log p / T): for one view's
    softmax that is temperature scaling of its logits; for a mean over views, the same scaling of
    its log. Below 1 it sharpens, above 1 it softens; the top class stays the top class."""
    return probs if temperature == 1 else (probs.clamp_min(1e-12).log() / temperature).softmax(1)


def blend(per_model: list[torch.Tensor], weights: list[float] | None = None,
          temperatures: list[float] | None = None) -> torch.Tensor:
    """The models' class probabilities of the same images, each recalibrated by its temperature
    (with_temperature; 1 by default), weighted by `weights` (summing to 1; equal by default)."""
    weights = [1 / len(per_model)] * len(per_model) if weights is None else weights
    temperatures = [1.0] * len(per_model) if temperatures is None else temperatures
    return sum(w * with_temperature(p, t) for w, p, t in zip(weights, per_model, temperatures, strict=True))


def batch_probs(models: list[torch.nn.Module], batch: torch.Tensor, views: list, policy: Policy,
                weights: list[float] | None = None, temperatures: list[float] | None = None) -> torch.Tensor:
    """Softmax over models x views of one uint8 NCHW batch on the models' device: (B, C) float32,
    each model's mean over the views, then their blend (recalibrated and weighted). A view listed
    twice weighs twice, predicted once."""

    def view_mean(model: torch.nn.Module) -> torch.Tensor:
        probs = 0
        for view, count in Counter(views).items():
            with policy.autocast():
                logits = model(tta_view(batch, view))
            probs = probs + (count / len(views)) * logits.float().softmax(1)
        return probs

    return blend([view_mean(model) for model in models], weights, temperatures)


@torch.no_grad()
def stream_probs(models: list[torch.nn.Module], images: np.ndarray | torch.Tensor, views: list, policy: Policy,
                 batch_size: int = PREDICT_BATCH, desc: str | None = None, bar: tqdm | None = None,
                 weights: list[float] | None = None, temperatures: list[float] | None = None) -> torch.Tensor:
    """batch_probs of every image of a host array or device tensor, streamed in chunks: (N, C) on
    the policy's device.
    The models must be in eval mode (BatchNorm's running statistics, no dropout)."""
    training = [type(m).__name__ for m in models if m.training]
    if training:
        raise ValueError(f"stream_probs needs models in eval mode; call .eval() on {', '.join(training)} first")
    out, device = None, policy.device
    forwards = len(models) * len(set(views))  # what the progress counts: images x views x models
    with contextlib.nullcontext(bar) if bar is not None else \
            tqdm(total=len(images) * forwards, desc=desc, unit="img", unit_scale=True, disable=desc is None) as bar:
        for start in range(0, len(images), CHUNK):
            chunk = images[start:start + CHUNK]
            chunk = (to_device(chunk, device) if isinstance(chunk, np.ndarray) else chunk.to(device)).permute(0, 3, 1, 2)
            for b in range(0, len(chunk), batch_size):
                probs = batch_probs(models, chunk[b:b + batch_size], views, policy, weights, temperatures)
                if out is None:
                    out = torch.empty((len(images), probs.shape[1]), dtype=torch.float32, device=device)
                out[start + b:start + b + len(probs)] = probs
                bar.update(len(probs) * forwards)
    return out


DISTINCT_VIEWS = list(dict.fromkeys(view for view_set in TTA_VIEWS.values() for view in view_set))


def top_two_gap(probs: torch.Tensor) -> torch.Tensor:
    """How sure a prediction is: log p1 - log p2 of its two most probable classes. For one view's
    softmax that is the gap between its top two logits; unlike the top probability it stays large
    for an image torn between no two classes (most of Kaggle's unscored fillers), whose label more
    views seldom change."""
    top = probs.clamp_min(1e-12).log().topk(2, 1).values
    return top[:, 0] - top[:, 1]


@torch.no_grad()
def gated_probs(models: list[torch.nn.Module], images: np.ndarray | torch.Tensor, views: list, gate: float,
                policy: Policy, batch_size: int = PREDICT_BATCH, desc: str | None = None,
                weights: list[float] | None = None, temperatures: list[float] | None = None) -> tuple[torch.Tensor, int]:
    """stream_probs with `views`, each added only where the views before it leave the image unsure:
    every image goes through `views[0]`; then, one distinct view at a time in the set's order, the
    images whose mean over the views so far (the models' weighted blend) has a top_two_gap under
    `gate` times the share of the set's views still to come go through the next one too (a view
    listed twice weighing twice); the others keep their mean. The views still to come can move the
    mean by no more than their share of it, so the gap an image needs shrinks as its views add up.
    Each model is streamed on its own so that the gate reads raw probabilities, as it was scored
    (bench/tta_gate.py), not recalibrated ones, and each model's view mean is recalibrated by its
    temperature, as it was fitted. Returns the probabilities and each model's forward passes. The
    host reads which images go on once a view: one wait each."""
    order = Counter(views)  # the distinct views, in the set's order, with their weights
    (first, count), *rest = order.items()
    with tqdm(total=len(images) * len(models) * len(order), desc=desc, unit="img", unit_scale=True,
              disable=desc is None) as bar:
        sums = [count * stream_probs([model], images, [first], policy, batch_size, bar=bar) for model in models]
        seen = torch.full((len(images), 1), float(count), device=sums[0].device)
        going, passes = torch.arange(len(images), device=sums[0].device), len(images)
        for k, (view, count) in enumerate(rest):
            to_come = sum(c for _, c in rest[k:]) / len(views)
            going = going[top_two_gap(blend([s[going] / seen[going] for s in sums], weights)) < gate * to_come]
            bar.total = bar.n + len(going) * len(models) * (len(rest) - k)  # the most still to come
            bar.refresh()
            if not len(going):
                break
            chosen = images[going.cpu().numpy()] if isinstance(images, np.ndarray) else images[going.to(images.device)]
            for s, model in zip(sums, models):
                s[going] += count * stream_probs([model], chosen, [view], policy, batch_size, bar=bar)
            seen[going] += count
            passes += len(going)
    return blend([s / seen for s in sums], weights, temperatures), passes


def view_set_probs(models: list[torch.nn.Module], images: torch.Tensor, policy: Policy,
                   batch_size: int = PREDICT_BATCH, desc: str | None = None) -> dict[str, torch.Tensor]:
    """stream_probs for every view set in TTA_VIEWS, each distinct view predicted once (one
    progress bar for them all with a `desc`)."""
    with tqdm(total=len(images) * len(DISTINCT_VIEWS) * len(models), desc=desc, unit="img", unit_scale=True,
              disable=desc is None, leave=False) as bar:
        per_view = {view: stream_probs(models, images, [view], policy, batch_size, bar=bar) for view in DISTINCT_VIEWS}
    return {name: torch.stack([per_view[view] for view in view_set]).mean(0) for name, view_set in TTA_VIEWS.items()}


def load_fold_model(run: RunDir, cfg: TrainConfig, classes: list[str], fold: int, policy: Policy) -> Classifier:
    """A finished fold's model on the policy's device, in eval mode (read on the CPU, moved once)."""
    model = for_config(cfg, len(classes))
    model.load_state_dict(run.fold(fold).load_model(run_meta(cfg, classes)))
    return policy.place(model).eval()


def load_fold_models(run: RunDir, cfg: TrainConfig, classes: list[str], policy: Policy) -> list[Classifier]:
    return [load_fold_model(run, cfg, classes, fold, policy) for fold in range(cfg.folds)]
