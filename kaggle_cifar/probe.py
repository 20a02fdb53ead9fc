"""Checks of the training and predict paths that run on any device, the CPU included, so that what a
GPU run depends on is proven here and measured on the user's machine by scripts/doctor.py:

- host syncs: the aten ops that make the host wait for a GPU, counted per training step and per
  predict batch (they dispatch on every device, so a sync a CUDA run would pay shows on the CPU);
- compiled graphs: how many graphs torch.compile built and why it broke any (a break or a
  recompile costs a GPU run its speed);
- device memory of a training run, estimated on the meta device (no memory, no compute)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kaggle_cifar.config import TrainConfig
from kaggle_cifar.errors import ConfigError
from kaggle_cifar.inference import CHUNK
from kaggle_cifar.model import CHANNELS, for_config
from kaggle_cifar.optim import Muon
from kaggle_cifar.train import Training, train_step

GiB = 2 ** 30

# Ops whose result the host must read before it can go on: a scalar (.item(), bool(t), int(t)), or
# an output whose size depends on the values.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique2", "unique_dim",
            "repeat_interleave"}


class HostSyncs(TorchDispatchMode):
    """Counts, by op name, the host syncs dispatched inside the `with` block. Reading a tensor of
    `on_host` is none: those stay in host memory whatever the device (host_step_counters)."""

    def __init__(self, on_host: list[torch.Tensor] = ()):
        super().__init__()
        self.ops: dict[str, int] = {}
        self.on_host = {t.data_ptr() for t in on_host}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in (args[1] if len(args) > 1 else []) or [])
        host_read = name == "_local_scalar_dense" and args[0].data_ptr() in self.on_host
        if (name in SYNC_OPS or bool_index) and not host_read:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return sum(self.ops.values())


class DispatchedOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside the `with` block, by name: on a GPU each one that
    computes is a kernel launch the host issues (a view is none)."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return sum(self.ops.values())


def host_step_counters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The step counters an optimizer keeps in host memory on any device (torch's and timm's, unless
    capturable or fused): timm's NAdamW, say, reads them each step, which waits for no GPU. Muon
    keeps none there: its AdamW is torch's fused kernel, counting on the device."""
    if isinstance(getattr(optimizer, "_base_optimizer", optimizer), Muon):
        return []
    return [step for group in optimizer.param_groups if not (group.get("capturable") or group.get("fused"))
            for p in group["params"] if isinstance(step := optimizer.state.get(p, {}).get("step"), torch.Tensor)]


@dataclass
class CompileCounts:
    graphs: int          # graphs dynamo handed to the backend: 1 for a model without breaks or recompiles
    graph_breaks: dict   # reason -> count
    recompiles: int      # frames compiled again beyond the first and the ones a graph break resumes in

    @property
    def clean(self) -> bool:
        return self.graphs == 1 and not self.graph_breaks and not self.recompiles


def compile_counts() -> CompileCounts:
    """Dynamo's counters since the last reset_compile_counts()."""
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    return CompileCounts(graphs=counters["stats"]["unique_graphs"], graph_breaks=breaks,
                         recompiles=max(0, counters["frames"]["total"] - 1 - sum(breaks.values())))


def reset_compile_counts() -> None:
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()


@dataclass
class MemoryEstimate:
    """Bytes a training run holds on the device at its peak."""
    images: int        # the training set as uint8, plus the fold's copies of its train/val rows
    weights: int       # weights, gradients and optimizer state (and the EMA copy)
    activations: int   # what one training step saves for its backward pass, in 16-bit
    predict: int       # a test chunk (uint8) while predicting
    evaluation: int = 0  # a forward pass at the run's predict batch: its largest layer's input, output and a residual

    @property
    def total(self) -> int:
        return self.images + self.weights + max(self.activations, self.predict + self.evaluation)


def estimate_memory(cfg: TrainConfig, train_images: int, num_classes: int = 10,
                    image_shape: tuple[int, int] = (32, 32)) -> MemoryEstimate:
    """Peak device memory of a run of `cfg` on `train_images` images, from the model built on the
    meta device: tensors there have shapes and dtypes but no storage, so nothing is computed or
    allocated. The allocator's rounding, cuDNN's workspaces and the CUDA context come on top."""
    model = for_config(cfg, num_classes).to("meta")
    saved: dict[tuple, int] = {}

    def nbytes(t: torch.Tensor) -> int:  # float activations as autocast keeps them: 16-bit
        return t.numel() * (2 if t.is_floating_point() else t.element_size())

    def keep(t: torch.Tensor):
        saved[(tuple(t.shape), t.dtype, id(t))] = nbytes(t)
        return t

    x = torch.zeros(cfg.batch_size, CHANNELS, *image_shape, device="meta", dtype=torch.uint8)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(x)
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, out: outputs.append(nbytes(out))
                                     if isinstance(out, torch.Tensor) else None)
             for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(cfg.predict_batch, CHANNELS, *image_shape, device="meta", dtype=torch.uint8))  # the shapes of eval's
    for hook in hooks:
        hook.remove()
    params = sum(p.numel() for p in model.parameters())
    # Muon keeps a momentum per conv and linear weight, and its batched updates a float32 copy and two
    # 16-bit iterates of them, padded (optim.Muon): 3 copies and their padding, rounded up to 4. Its
    # AdamW's two are on BatchNorm and biases (<1%).
    optimizer_slots = {"sgd": 1, "momentum": 1, "muon": 4, "lamb": 2, "adamw": 2, "adam": 2}.get(cfg.base_optimizer, 2)
    optimizer_slots += cfg.optimizer != cfg.base_optimizer  # Lookahead's slow weights
    copies = 2 + optimizer_slots + (cfg.ema_decay > 0)  # weights, gradients, optimizer state, EMA
    image_bytes = CHANNELS * image_shape[0] * image_shape[1]
    return MemoryEstimate(images=2 * train_images * image_bytes, weights=4 * params * copies,
                          activations=sum(saved.values()), predict=CHUNK * image_bytes,
                          evaluation=3 * max(outputs, default=0))


def check_fits(cfg: TrainConfig, train_images: int, num_classes: int, image_shape: tuple[int, int],
               device: torch.device) -> MemoryEstimate | None:
    """On a GPU, the run's estimate, refused before training when it exceeds 90% of the GPU's
    memory (the rest: the CUDA context, cuDNN's workspaces, the allocator's rounding): an
    out-of-memory error would come at the first epoch's end, before its checkpoint, on every
    resume. Elsewhere nothing is estimated (None)."""
    if device.type != "cuda":
        return None
    estimate = estimate_memory(cfg, train_images, num_classes, image_shape)
    total = torch.cuda.mem_get_info(device)[1]
    if estimate.total > 0.9 * total:
        raise ConfigError(
            f"this run needs about {estimate.total / GiB:.1f} GiB of {device}'s {total / GiB:.1f} GiB (training "
            f"images {estimate.images / GiB:.1f}, weights and optimizer {estimate.weights / GiB:.1f}, a training "
            f"step's activations {estimate.activations / GiB:.1f}, a prediction batch of {cfg.predict_batch} "
            f"{(estimate.predict + estimate.evaluation) / GiB:.1f}): lower --batch-size (activations scale with "
            f"it) or --image-size")
    return estimate


def overflow_step_changes_nothing(t: Training, inputs: torch.Tensor, targets: torch.Tensor, step: int) -> bool:
    """Run one training step whose loss is inf, as an fp16 overflow makes it: true if the loss
    scaler skipped it cleanly, leaving every weight and every optimizer state tensor as it was
    (a fused optimizer must honour the scaler's inf flag on the device)."""
    def tensors() -> list[torch.Tensor]:
        state = [v for s in t.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return [p.detach().clone() for p in t.model.parameters()] + [v.clone() for v in state]

    before, criterion = tensors(), t.criterion
    t.criterion = lambda logits, y: criterion(logits, y) * float("inf")
    try:
        train_step(t, inputs, targets, step)
    finally:
        t.criterion = criterion
    return all(torch.equal(a, b) for a, b in zip(before, tensors(), strict=True))
