"""The architectures side by side: parameters, training FLOPs per image (torch's FLOP counter) and
training images/s on this machine (synthetic 32x32 images, the default precision, eager), as a
Markdown table for README.md.

    python bench/archs.py                       # every architecture built here, width 64
    python bench/archs.py --only resnet18_cifar fast_cifar --batch-size 128
"""

from __future__ import annotations

import argparse
import time

from common import Table  # bench/common.py, beside this script; first, before torch loads
import torch

from kaggle_cifar import cli
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.device import Policy, synchronize
from kaggle_cifar.folds import FoldData
from kaggle_cifar.model import ARCHS, build_model, training_flops_per_image
from kaggle_cifar.train import build_training, train_step


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(ARCHS), default=list(ARCHS), metavar="ARCH")
    parser.add_argument("--batch-size", type=cli.positive_int, default=64)
    parser.add_argument("--steps", type=cli.positive_int, default=4, help="timed training steps per architecture")
    args = parser.parse_args()
    policy = Policy.of(torch.device("cpu"))
    device = policy.device
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 32, 32, 3), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 10, (args.batch_size,), generator=g)
    data = FoldData(0, [str(c) for c in range(10)], torch.full((3,), 120.0), torch.full((3,), 64.0),
                    images, targets, images, targets, images[:0])
    table = Table()
    for arch in args.only:
        model = build_model(arch, 10, 64)
        params = sum(p.numel() for p in model.parameters())
        flops = training_flops_per_image(model, (3, 32, 32))
        t = build_training(TrainConfig(arch=arch, batch_size=args.batch_size), data, policy)
        x = images.permute(0, 3, 1, 2)
        train_step(t, x, targets, 1)  # warm-up
        synchronize(device)
        t0 = time.perf_counter()
        for step in range(args.steps):
            train_step(t, x, targets, step + 2)
        synchronize(device)
        rate = args.steps * args.batch_size / (time.perf_counter() - t0)
        table.add(arch=arch, parameters=f"{params / 1e6:.1f} M", **{"training GFLOP per image": f"{flops / 1e9:.2f}",
                                                                    "CPU training images/s": f"{rate:,.0f}"})
    print(f"\nwidth 64, batch {args.batch_size}, {policy.describe()}, eager, "
          f"torch {torch.__version__}\n")
    print(table)
    return 0


if __name__ == "__main__":
    cli.run(main)
