"""torchrun with 2 CPU processes (gloo): the same outputs as one process."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import torch

from conftest import ROOT, TINY, run_script


def torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_two_processes_give_the_same_run_and_submission_as_one(competition, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    # float32: in bf16 the rounding depends on the thread count, which differs (2 threads against 1 each).
    # SGD: its update is linear in the gradient, so two ranks' gradients, averaged in another order,
    # stay within float32 rounding of one process's; Muon's Newton-Schulz iterations amplify those bits.
    flags = ["--input", str(competition), *TINY, "--precision", "float32", "--optimizer", "sgd"]
    run_script("train_folds.py", *flags, "--run-dir", str(single))
    torchrun("train_folds.py", *flags, "--run-dir", str(multi))
    for fold in (0, 1):
        a = torch.load(single / f"fold{fold}" / "model.pt", weights_only=True)["model"]
        b = torch.load(multi / f"fold{fold}" / "model.pt", weights_only=True)["model"]
        for name in a:
            torch.testing.assert_close(b[name], a[name], msg=name)
    pd.testing.assert_frame_equal(pd.read_csv(multi / "oof.csv"), pd.read_csv(single / "oof.csv"), atol=1e-5)

    sub_single = run_script("predict.py", "--input", str(competition), "--run-dir", str(single)).stdout
    proc = torchrun("predict.py", "--input", str(competition), "--run-dir", str(multi))
    assert proc.stdout == sub_single  # rank 0 alone writes, after gathering both shards
    assert len(proc.stdout.splitlines()) == 25
    assert np.array_equal(pd.read_csv(multi / "folds.csv"), pd.read_csv(single / "folds.csv"))
