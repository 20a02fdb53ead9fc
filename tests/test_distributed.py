"""torchrun with 2 CPU processes (gloo): the same outputs as one process."""

from __future__ import annotations

import json
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

from conftest import ROOT, TINY, call_script, hooked_pythonpath, make_competition, torchrun


# Rank 1 of torchrun's first attempt kills itself (SIGKILL, as the OOM killer or a lost node would)
# as fold 1 (or $KILL_FOLD) starts epoch 3.
KILL_RANK_1 = {"kaggle_cifar.train": """
if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "1":
    real = module.train_one_epoch

    def train_one_epoch(t, cfg, data, epoch, *rest, **kwargs):
        if data.fold == int(os.environ.get("KILL_FOLD", "1")) and epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(t, cfg, data, epoch, *rest, **kwargs)

    module.train_one_epoch = train_one_epoch
"""}


# float32: in bf16 the rounding depends on the thread count, which differs (2 threads against 1 each).
# SGD: its update is linear in the gradient, so two ranks' gradients, averaged in another order,
# stay within float32 rounding of one process's; Muon's Newton-Schulz iterations amplify those bits.
SETTINGS = [*TINY, "--precision", "float32", "--optimizer", "sgd"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, Path]:
    """A competition, and a run of it in one process: what every launch below must reproduce."""
    root = tmp_path_factory.mktemp("one_process")
    competition = make_competition(root / "input")
    call_script("train_folds.py", "--input", str(competition), *SETTINGS, "--run-dir", str(root / "single"))
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

    sub_single = call_script("predict.py", "--input", str(competition), "--run-dir", str(single)).stdout
    proc = torchrun("predict.py", "--input", str(competition), "--run-dir", str(multi))
    assert proc.stdout == sub_single  # rank 0 alone writes, after gathering both shards
    assert all(re.search(rf"^rank {rank}: \d+ images, ", proc.stderr, flags=re.M) for rank in (0, 1))  # each its shard
    assert len(proc.stdout.splitlines()) == 25
    assert np.array_equal(pd.read_csv(multi / "folds.csv"), pd.read_csv(single / "folds.csv"))


def test_a_rank_killed_mid_fold_is_restarted_by_torchrun_and_the_run_ends_as_an_uninterrupted_one(one_process, tmp_path):
    (competition, single), restarted = one_process, tmp_path / "restarted"
    flags = ["--input", str(competition), *SETTINGS]
    proc = torchrun("train_folds.py", *flags, "--run-dir", str(restarted),
                    launcher=("--standalone", "--nproc_per_node=2", "--max-restarts=1"),
                    env={"PYTHONPATH": hooked_pythonpath(tmp_path / "hook", KILL_RANK_1),
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


# A full fit on two processes, as on 2 GPUs: its one fold trains on both, the batch split between
# them. test_convnext normalises with LayerNorm, which has no batch statistics: each replica's share
# then gives exactly its part of one process's gradient, and any difference is rounding. (BatchNorm
# normalises each replica's own share, as in torchvision's and timm's scripts without --sync-bn: not
# one process's model.) Measured, relative to each tensor: Muon 5e-5 at worst and SGD 1e-6; a replica
# training on its share alone 3.1 and 9.6 (bench/RESULTS.md).
FULL_FIT = ["--folds", "1", "--holdout", "20", "--epochs", "4", "--batch-size", "16", "--lr", "0.05",
            "--precision", "float32", "--arch", "test_convnext"]
TOLERANCE = 1e-3


def near_weights(a: Path, b: Path) -> None:
    """Every float tensor of fold 0's model in `b` within TOLERANCE of `a`'s, relative to its size."""
    x = torch.load(a / "fold0" / "model.pt", weights_only=True)["model"]
    y = torch.load(b / "fold0" / "model.pt", weights_only=True)["model"]
    for name in x:
        if x[name].is_floating_point():
            assert (y[name] - x[name]).norm() <= TOLERANCE * x[name].norm() + 1e-7, name


@pytest.fixture(scope="module", params=["muon", "sgd"])
def full_fit(request, one_process, tmp_path_factory) -> tuple[Path, list[str], Path]:
    """A full fit in one process: the competition, the flags, the run dir."""
    competition, flags = one_process[0], ["--input", str(one_process[0]), *FULL_FIT, "--optimizer", request.param]
    run_dir = tmp_path_factory.mktemp("full_fit") / request.param
    call_script("train_folds.py", *flags, "--run-dir", str(run_dir))
    return competition, flags, run_dir


def test_a_full_fit_on_two_processes_trains_one_processs_weights_with_the_batch_split(full_fit, tmp_path):
    _, flags, single = full_fit
    proc = torchrun("train_folds.py", *flags, "--run-dir", str(tmp_path / "split"))
    assert "rank 0: fold 0 on ranks 0-1 (DistributedDataParallel, the batch split 2 ways)" in proc.stderr
    near_weights(single, tmp_path / "split")
    one, two = pd.read_csv(single / "fold0" / "log.csv"), pd.read_csv(tmp_path / "split" / "fold0" / "log.csv")
    # the epochs' losses are the whole batch's (summed over the replicas), their evaluations the model's
    for column in ("train_loss", "train_acc", "val_loss", "val_acc"):
        np.testing.assert_allclose(two[column], one[column], rtol=1e-3, err_msg=column)
    # (a full fit's held-out images are its holdout)
    np.testing.assert_allclose(np.load(tmp_path / "split" / "fold0" / "oof.npy"), np.load(single / "fold0" / "oof.npy"),
                               atol=1e-4)


@pytest.mark.parametrize("full_fit", ["muon"], indirect=True)
def test_a_replica_killed_mid_fold_is_restarted_and_the_fold_resumes_as_one_process_trains_it(full_fit, tmp_path):
    _, flags, single = full_fit
    proc = torchrun("train_folds.py", *flags, "--run-dir", str(tmp_path / "restarted"),
                    launcher=("--standalone", "--nproc_per_node=2", "--max-restarts=1"),
                    env={"PYTHONPATH": hooked_pythonpath(tmp_path / "hook", KILL_RANK_1),
                         "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "KILL_FOLD": "0"})
    assert "failed (exitcode: -9) local_rank: 1" in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"fold 0: resuming after epoch [12] from", proc.stderr)
    near_weights(single, tmp_path / "restarted")


# Rank 1's budget clock runs 3x fast: alone, its epochs would look 3x longer and its plan shorter
# than rank 0's. Replicas must train the same steps, or one waits forever for the other's next
# all-reduce.
FAST_CLOCK_ON_RANK_1 = {"kaggle_cifar.budget": """
if os.environ.get("RANK") == "1":
    real = module.clock
    module.clock = lambda: 3 * real()
"""}


def test_a_time_budget_over_replicas_is_planned_by_the_first_ones_clock(one_process, tmp_path):
    flags = ["--input", str(one_process[0]), *FULL_FIT, "--time-budget", "12s"]
    proc = torchrun("train_folds.py", *flags, "--run-dir", str(tmp_path / "budget"),
                    env={"PYTHONPATH": hooked_pythonpath(tmp_path / "hook", FAST_CLOCK_ON_RANK_1)})
    assert "fold 0: re-planned after epoch" in proc.stderr  # the plan moved as rank 0 measured its epochs
    result = json.loads((tmp_path / "budget" / "fold0" / "result.json").read_text())
    assert result["epochs"] == pytest.approx(result["plan"]["epochs"], abs=0.5) and result["epochs"] > 4  # (2 steps an epoch)
    report = json.loads((tmp_path / "budget" / "report.json").read_text())
    assert report["time_budget"]["used_s"] <= 12 * 1.1


def test_max_restarts_on_torchruns_shared_store_is_refused_naming_the_setting(monkeypatch):
    from kaggle_cifar import distributed
    from kaggle_cifar.errors import ConfigError

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(ConfigError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        distributed.setup("cpu")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what the setting gives the workers
    assert distributed.setup("cpu").world_size == 1


def test_folds_spread_over_the_ranks_whole_while_they_last_then_over_groups_of_ranks():
    from kaggle_cifar.distributed import rank_groups

    assert rank_groups(1, 5) == [[0]]
    assert rank_groups(2, 5) == [[0], [1]]  # fold k on rank k mod 2
    assert rank_groups(5, 5) == [[0], [1], [2], [3], [4]]
    assert rank_groups(2, 1) == [[0, 1]]  # a full fit on 2 GPUs
    assert rank_groups(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert rank_groups(5, 2) == [[0, 1], [2, 3]]  # rank 4 has no fold
