"""The optimizer's own time per step, apart from the forward and backward passes: optimizer.step()
on random gradients of the model's weights, for SGD (fused) and timm's Muon with its Newton-Schulz
orthogonalisation in bf16 (timm's default) and in float32 (this project's choice where bf16 is not
native). Compare with the whole training step's time (bench/bench.py's images/s at the same batch).

    python bench/optimizers.py --arch resnet18_cifar --width 16
    python bench/optimizers.py --arch fast_cifar --width 64
"""

from __future__ import annotations

import argparse
import time

from common import Table  # bench/common.py, beside this script; first, before torch loads
import torch

from kaggle_cifar import cli
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.model import ARCHS, build_model
from kaggle_cifar.optim import build_optimizer

SETTINGS = {  # name: (the config's optimizer settings, Muon's Newton-Schulz dtype)
    "sgd (fused)": ({"optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4}, torch.float32),
    "muon, Newton-Schulz in bf16": ({"optimizer": "muon"}, torch.bfloat16),
    "muon, Newton-Schulz in float32": ({"optimizer": "muon"}, torch.float32),
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
    for name, (settings, dtype) in SETTINGS.items():
        optimizer = build_optimizer(TrainConfig(**settings), model, dtype)
        for _ in range(2):
            optimizer.step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        table.add(optimizer=name, **{"ms per step": f"{(time.perf_counter() - t0) / args.steps * 1000:.1f}"})
    print(f"\n{args.arch} at width {args.width} on the CPU ({torch.backends.cpu.get_cpu_capability()}), "
          f"torch {torch.__version__}\n")
    print(table)
    return 0


if __name__ == "__main__":
    cli.run(main)
