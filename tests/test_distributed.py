"""torchrun with 2 CPU processes (gloo): the same outputs as one process."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, TINY, make_competition, run_script


def torchrun(script: str, *args: str, launcher: tuple[str, ...] = ("--standalone", "--nproc_per_node=2"),
             env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / "scripts" / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# Loaded by every worker at start-up (a sitecustomize on PYTHONPATH): rank 1 of torchrun's first
# attempt kills itself (SIGKILL, as the OOM killer or a lost node would) as fold 1 starts epoch 3.
KILL_RANK_1 = """
import importlib.abc, importlib.machinery, os, signal, sys

class KillRank1(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "kaggle_cifar.train" or os.environ.get("TORCHELASTIC_RESTART_COUNT") != "0" \
                or os.environ.get("RANK") != "1":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            real = module.train_one_epoch

            def train_one_epoch(t, cfg, data, epoch, *rest, **kwargs):
                if data.fold == 1 and epoch == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(t, cfg, data, epoch, *rest, **kwargs)

            module.train_one_epoch = train_one_epoch

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, KillRank1())
"""


# float32: in bf16 the rounding depends on the thread count, which differs (2 threads against 1 each).
# SGD: its update is linear in the gradient, so two ranks' gradients, averaged in another order,
# stay within float32 rounding of one process's; Muon's Newton-Schulz iterations amplify those bits.
SETTINGS = [*TINY, "--precision", "float32", "--optimizer", "sgd"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, Path]:
    """A competition, and a run of it in one process: what every launch below must reproduce."""
    root = tmp_path_factory.mktemp("one_process")
    competition = make_competition(root / "input")
    run_script("train_folds.py", "--input", str(competition), *SETTINGS, "--run-dir", str(root / "single"))
    return competition, root / "single"


def same_weights(a: Path, b: Path, folds: int = 2) -> None:
    for fold in range(folds):
        x = torch.load(a / f"fold{fold}" / "model.pt", weights_only=True)["model"]
        y = torch.load(b / f"fold{fold}" / "model.pt", weights_only=True)["model"]
        for name in x:
            torch.testing.assert_close(y[name], x[name], msg=name)


def test_two_processes_give_the_same_run_and_submission_as_one(one_process, tmp_path):
    (competition, single), multi = one_process, tmp_path / "multi"
    flags = ["--input", str(competition), *SETTINGS]
    torchrun("train_folds.py", *flags, "--run-dir", str(multi))
    same_weights(single, multi)
    pd.testing.assert_frame_equal(pd.read_csv(multi / "oof.csv"), pd.read_csv(single / "oof.csv"), atol=1e-5)

    sub_single = run_script("predict.py", "--input", str(competition), "--run-dir", str(single)).stdout
    proc = torchrun("predict.py", "--input", str(competition), "--run-dir", str(multi))
    assert proc.stdout == sub_single  # rank 0 alone writes, after gathering both shards
    assert len(proc.stdout.splitlines()) == 25
    assert np.array_equal(pd.read_csv(multi / "folds.csv"), pd.read_csv(single / "folds.csv"))


def test_a_rank_killed_mid_fold_is_restarted_by_torchrun_and_the_run_ends_as_an_uninterrupted_one(one_process, tmp_path):
    (competition, single), restarted = one_process, tmp_path / "restarted"
    flags = ["--input", str(competition), *SETTINGS]
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILL_RANK_1)
    proc = torchrun("train_folds.py", *flags, "--run-dir", str(restarted),
                    launcher=("--standalone", "--nproc_per_node=2", "--max-restarts=1"),
                    env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")]),
                         "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert "failed (exitcode: -9) local_rank: 1" in proc.stderr, proc.stderr[-3000:]  # rank 1 was killed
    # its fold went on from its last checkpoint: epoch 2's, or epoch 1's if the kill came before the
    # background write of epoch 2's ended
    assert re.search(r"fold 1: resuming after epoch [12] from", proc.stderr)
    same_weights(single, restarted)
    pd.testing.assert_frame_equal(pd.read_csv(restarted / "oof.csv"), pd.read_csv(single / "oof.csv"), atol=1e-5)


def test_two_machines_on_one_run_dir_each_train_their_folds(one_process, tmp_path):
    """Two torchrun launchers meeting at one rendezvous address, as two nodes would (here both on
    the loopback address), one process each: the folds split over the nodes as over local ranks."""
    (competition, single), nodes = one_process, tmp_path / "nodes"
    flags = ["--input", str(competition), *SETTINGS]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes", str(ROOT / "scripts" / "train_folds.py"), *flags,
         "--run-dir", str(nodes)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    same_weights(single, nodes)
    assert (nodes / "report.json").exists()


def test_max_restarts_on_torchruns_shared_store_is_refused_naming_the_setting(monkeypatch):
    from kaggle_cifar import distributed
    from kaggle_cifar.errors import ConfigError

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(ConfigError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        distributed.setup("cpu")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what the setting gives the workers
    assert distributed.setup("cpu").world_size == 1
