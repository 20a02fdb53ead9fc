"""A full fit (--folds 1) in 1 and in 2 processes (torchrun, one thread each): its one fold trains
on both with DistributedDataParallel, the batch split between them. Prints the training images/s
(epochs after the first) side by side, and how far the 2-process weights are from the 1-process
ones (each float tensor's difference relative to its size; BatchNorm normalises each replica's
share of the batch, so a network with it is not exactly one process's model).

    python bench/data_parallel.py --input /tmp/cifar-small --epochs 3 --arch fast_cifar --width 32
    python bench/data_parallel.py --input /tmp/cifar-small --epochs 3 --arch test_convnext

Any other flag is train_folds.py's. Run outputs go to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Table, warm_epochs  # bench/common.py, beside this script; first, before torch loads
import torch

from kaggle_cifar.device import cpu_name
from kaggle_cifar.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def weight_distance(a: Path, b: Path) -> float:
    """The largest relative difference of a float tensor between two runs' fold-0 models."""
    x = torch.load(a / "fold0" / "model.pt", weights_only=True)["model"]
    y = torch.load(b / "fold0" / "model.pt", weights_only=True)["model"]
    return max(float((y[k] - x[k]).norm() / x[k].norm().clamp_min(1e-12)) for k in x if x[k].is_floating_point())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args, train_flags = parser.parse_known_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    print(f"cpu ({cpu_name()}), one thread a process; torch {torch.__version__}; train_folds.py --folds 1 "
          f"{' '.join(train_flags)}", flush=True)
    table, runs = Table(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for processes in args.processes:
            runs[processes] = Path(tmp) / f"p{processes}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(ROOT / "scripts" / "train_folds.py"), "--input", args.input, "--folds", "1", *train_flags,
                   "--run-dir", str(runs[processes])]
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{processes} processes failed:\n{proc.stderr[-3000:]}")
            epochs = warm_epochs(RunDir(runs[processes]).fold(0))
            first = runs[args.processes[0]]
            table.add(processes=processes, images_per_s=f"{epochs['train_images_per_s'].mean():,.0f}",
                      epoch_s=f"{epochs['seconds'].mean():.1f}", val_acc=f"{epochs['val_acc'].iloc[-1]:.4f}",
                      weights_vs_first=f"{weight_distance(first, runs[processes]):.1e}")
    print()
    print(table)


if __name__ == "__main__":
    main()
