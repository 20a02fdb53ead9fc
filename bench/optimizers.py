"""The optimizer's own time and dispatched ops per step, apart from the forward and backward
passes: optimizer.step() on random gradients of the model's weights, for SGD (fused), timm's Muon
(its loop over the weights, Newton-Schulz in bf16) and this project's batched Muon, one batch per
weight shape (a CPU's) or in padded batches (a bf16 GPU's), its Newton-Schulz in bf16 and in
float32 (this project's choice where bf16 is not native). Compare with the whole training step's
time (bench/bench.py's images/s at the same batch).

    python bench/optimizers.py --arch resnet18_cifar --width 16
    python bench/optimizers.py --arch fast_cifar --width 64
"""

from __future__ import annotations

import argparse
import time

from common import Table  # bench/common.py, beside this script; first, before torch loads
import torch

from timm.optim import create_optimizer_v2

from kaggle_cifar import cli
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.device import GPU_MUON_BUCKETS, cpu_name
from kaggle_cifar.model import ARCHS, build_model
from kaggle_cifar.optim import build_optimizer
from kaggle_cifar.probe import DispatchedOps

MUON = TrainConfig(optimizer="muon")
SETTINGS = {  # name: the optimizer of a model
    "sgd (fused)": lambda model: build_optimizer(
        TrainConfig(optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=5e-4), model, torch.float32),
    "timm's muon (bf16)": lambda model: create_optimizer_v2(model, "muon", lr=MUON.lr, weight_decay=MUON.weight_decay,
                                                            momentum=MUON.momentum),
    "muon per shape, bf16": lambda model: build_optimizer(MUON, model, torch.bfloat16),
    f"muon in {GPU_MUON_BUCKETS} padded batches, bf16": lambda model: build_optimizer(MUON, model, torch.bfloat16,
                                                                                     GPU_MUON_BUCKETS),
    "muon per shape, float32": lambda model: build_optimizer(MUON, model, torch.float32),
}


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(ARCHS), default="resnet18_cifar")
    parser.add_argument("--width", type=cli.positive_int, default=16)
    parser.add_argument("--steps", type=cli.positive_int, default=10, help="timed steps per optimizer, after 2 warm-up steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.arch, 10, args.width).to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    table = Table()
    for name, make in SETTINGS.items():
        optimizer = make(model)
        for _ in range(2):
            optimizer.step()
        with DispatchedOps() as dispatched:
            optimizer.step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        table.add(optimizer=name, **{"ms per step": f"{(time.perf_counter() - t0) / args.steps * 1000:.1f}",
                                     "ops per step": dispatched.count})
    print(f"\n{args.arch} at width {args.width} on the CPU ({cpu_name()}, {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}\n")
    print(table)
    return 0


if __name__ == "__main__":
    cli.run(main)
