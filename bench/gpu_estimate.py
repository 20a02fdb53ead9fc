"""Paper estimates of the default run (5 folds x 30 epochs, ResNet18 width 64, batch 128) on GPUs
this project has never had, before and after Muon's batched step: what the CPU can count, and the
time it implies under the assumptions printed with it. Not measured on a GPU.

    python bench/gpu_estimate.py                 # the default config
    python bench/gpu_estimate.py --arch fast_cifar --width 64

Counted here: ops dispatched per training step (a TorchDispatchMode around the step, with the
GPU's precision and Muon batching), the kernel launches they imply (a view launches none; a foreach
op over tensors of mixed strides or dtypes launches one per tensor, as CUDA's slow path does), the
FLOPs per step (torch's counter, and Muon's Newton-Schulz by its formula), and device memory (on the
meta device). Assumed: a GPU reaches EFFICIENCY of its dense 16-bit peak, the host spends
HOST_SECONDS_PER_OP on each dispatched op, and a step takes the longer of the two (the host queues
kernels ahead of the GPU, so whichever is slower sets the pace).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from common import Table  # bench/common.py, beside this script; first, before torch loads
import torch
from timm.optim import create_optimizer_v2
from timm.optim import muon as timm_muon
from torch._prims_common import is_non_overlapping_and_dense_or_false as dense

from kaggle_cifar import probe
from kaggle_cifar.config import add_config_flags, config_from_args
from kaggle_cifar.device import GPU_MUON_BUCKETS, Policy
from kaggle_cifar.model import build_model, training_flops_per_image
from kaggle_cifar.optim import build_optimizer, newton_schulz_flops, partition

EFFICIENCY = 0.3            # of the dense fp16/bf16 tensor-core peak, for small 32 px convolutions
HOST_SECONDS_PER_OP = 5e-6  # Python and dispatcher time per eager op, a CUDA launch included
TRAIN_IMAGES = 40_000       # a fold's training rows: 4/5 of 50,000


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float      # dense fp16/bf16 tensor-core FLOP/s, from the vendor's sheet
    dtype: torch.dtype     # what the run computes in there (device.Policy.of)
    memory_gib: float


GPUS = [Gpu("H100 SXM", 989e12, torch.bfloat16, 80), Gpu("T4", 65e12, torch.float16, 15)]


class Launches(probe.DispatchedOps):
    """Dispatched ops, and the kernel launches they would be on a GPU."""

    def __init__(self):
        super().__init__()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith("_foreach_") or name.startswith("_fused_"):
            lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
            fast = all(dense(t) for tensors in lists for t in tensors) and all(
                a.stride() == b.stride() and a.dtype == b.dtype for tensors in lists[1:] for a, b in zip(lists[0], tensors))
            self.launches += 1 if fast else len(lists[0])
        elif not func.is_view:
            self.launches += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def timm_fallback_as_on_a_gpu():
    """timm's Muon gives its AdamW foreach=None, which picks the foreach path on a GPU and the
    per-tensor loop on the CPU: counted as on a GPU."""
    adamw = timm_muon.adamw
    timm_muon.adamw = lambda *args, foreach=None, **kwargs: adamw(*args, foreach=True, **kwargs)


def count(model, optimizer, batch, loss_scaling: bool) -> tuple[Launches, Launches]:
    """(forward and backward, optimizer step) of one training step, after a first one."""
    scaler = torch.amp.GradScaler("cpu", enabled=loss_scaling)
    counted = []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with Launches() as forward_backward:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's casts are ops too (fp16's alike)
                loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
            scaler.scale(loss).backward()
        with Launches() as step:
            scaler.step(optimizer)
            scaler.update()
        counted = [forward_backward, step]
    return tuple(counted)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_flags(parser)
    cfg = config_from_args(parser.parse_args(argv))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
             torch.randint(0, 10, (8,), generator=g))  # ops do not depend on the batch size
    timm_fallback_as_on_a_gpu()
    per_image = training_flops_per_image(build_model(cfg.arch, 10, cfg.width), (3, 32, 32))
    model_flops = per_image * cfg.batch_size
    shapes = [(min(s), max(s)) for p in build_model(cfg.arch, 10, cfg.width).parameters() if p.ndim >= 2
              for s in [(p.shape[0], p[0].numel())]]

    def newton_schulz(buckets: int | None) -> float:
        return sum(len(g) * newton_schulz_flops(max(shapes[i][0] for i in g), max(shapes[i][1] for i in g))
                   for g in partition(shapes, buckets))

    memory = probe.estimate_memory(cfg, TRAIN_IMAGES + 10_000)
    steps = cfg.folds * cfg.epochs * (TRAIN_IMAGES // cfg.batch_size)
    evaluation = cfg.folds * cfg.epochs * 10_000 * per_image / 3  # a forward pass over the held-out fold
    print(f"config: {cfg.describe()}")
    print(f"model: {model_flops / 1e9:.0f} GFLOP forward and backward per step of {cfg.batch_size}; Muon's "
          f"Newton-Schulz {newton_schulz(None) / 1e9:.1f} GFLOP unpadded, {newton_schulz(GPU_MUON_BUCKETS) / 1e9:.1f} "
          f"in {GPU_MUON_BUCKETS} padded batches; {steps:,} steps; device memory {memory.total / 2**30:.1f} GiB "
          f"(weights and optimizer {memory.weights / 2**30:.2f}, activations {memory.activations / 2**30:.2f})")
    print(f"assumed: {EFFICIENCY:.0%} of the 16-bit tensor-core peak, {HOST_SECONDS_PER_OP * 1e6:.0f} us of host time "
          f"per dispatched op, a step the longer of the two. Not measured on a GPU.")
    table = Table()
    for gpu in GPUS:
        policy_buckets = GPU_MUON_BUCKETS if gpu.dtype == torch.bfloat16 else None
        for muon in ("timm's", f"batched ({policy_buckets or 'per shape'})", "batched (per shape)" if policy_buckets
                     else f"batched ({GPU_MUON_BUCKETS})"):
            model = build_model(cfg.arch, 10, cfg.width)
            if muon == "timm's":
                optimizer, buckets = create_optimizer_v2(model, "muon", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                         momentum=cfg.momentum), None
            else:
                buckets = None if "per shape" in muon else GPU_MUON_BUCKETS
                optimizer = build_optimizer(cfg, model, gpu.dtype, buckets)
            forward_backward, step = count(model, optimizer, batch, gpu.dtype == torch.float16)
            ops = forward_backward.count + step.count
            launches = forward_backward.launches + step.launches
            flops = model_flops + newton_schulz(buckets)
            gpu_seconds = flops / (gpu.peak_flops * EFFICIENCY)
            host_seconds = ops * HOST_SECONDS_PER_OP
            run = steps * max(gpu_seconds, host_seconds) + evaluation / (gpu.peak_flops * EFFICIENCY)
            table.add(gpu=gpu.name, muon=muon, ops_per_step=f"{forward_backward.count} + {step.count}",
                      launches=launches, gflop_per_step=f"{flops / 1e9:.0f}", gpu_ms=f"{gpu_seconds * 1e3:.2f}",
                      host_ms=f"{host_seconds * 1e3:.2f}", bound="host" if host_seconds > gpu_seconds else "GPU",
                      run_minutes=f"{run / 60:.1f}", fits=f"{memory.total / 2**30:.1f} of {gpu.memory_gib} GiB")
    print()
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
