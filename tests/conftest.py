"""Tiny Kaggle-format competitions, made by the tests themselves."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# One OpenMP thread, here and in the scripts the tests start: the tests' networks and batches are
# tiny, so a second thread buys nothing, and beside a busy process (a training run) its barriers
# made a test 6x slower (bench/RESULTS.md). Set before torch starts OpenMP; a value already set wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import kaggle_cifar  # noqa: E402  before any test module loads torch: the package sets the wait policy

from kaggle_cifar import device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "frog"]
# One saturated colour per class plus noise: learnable in a few CPU steps, so the end-to-end tests
# can demand accuracy far above chance, which a pipeline that scrambles ids or labels cannot reach.
COLOURS = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220]])


def class_image(rng: np.random.Generator, c: int, size: int = 32) -> np.ndarray:
    noise = rng.integers(-35, 36, size=(size, size, 3))
    return np.clip(COLOURS[c] + noise, 0, 255).astype(np.uint8)


def make_competition(root: Path, per_class: int = 20, n_test: int = 24, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    targets = np.repeat(np.arange(len(CLASSES)), per_class)
    rng.shuffle(targets)
    for i, c in enumerate(targets, 1):
        Image.fromarray(class_image(rng, c)).save(root / "train" / f"{i}.png")
    (root / "trainLabels.csv").write_text("id,label\n" + "".join(f"{i},{CLASSES[c]}\n" for i, c in enumerate(targets, 1)))
    test_targets = rng.integers(0, len(CLASSES), n_test)
    for i, c in enumerate(test_targets, 1):
        Image.fromarray(class_image(rng, c)).save(root / "test" / f"{i}.png")
    (root / "sampleSubmission.csv").write_text("id,label\n" + "".join(f"{i},cat\n" for i in range(1, n_test + 1)))
    np.save(root.parent / f"{root.name}_test_targets.npy", test_targets)
    return root


def kill_in(monkeypatch, fold: int, epoch: int):
    """train.train_one_epoch interrupted (as by Ctrl-C) when fold `fold` starts epoch `epoch`
    (from 0); returns the real one, to put back for the resume."""
    from kaggle_cifar import train

    real_epoch = train.train_one_epoch

    def killed(t, cfg, data, e, *rest):
        if data.fold == fold and e == epoch:
            raise KeyboardInterrupt("simulated kill")
        return real_epoch(t, cfg, data, e, *rest)

    monkeypatch.setattr(train, "train_one_epoch", killed)
    return real_epoch


def record_newton_schulz(monkeypatch) -> list:
    """The dtype of every weight's orthogonalisation in Muon's steps from now on, in order."""
    from kaggle_cifar.optim import Bucket

    used, real = [], Bucket.orthogonalise

    def recorded(bucket, dtype, *args, **kwargs):
        used.extend([dtype] * len(bucket.slots))
        return real(bucket, dtype, *args, **kwargs)

    monkeypatch.setattr(Bucket, "orthogonalise", recorded)
    return used


@pytest.fixture
def competition(tmp_path) -> Path:
    return make_competition(tmp_path / "input")


NATIVE_BF16 = device.cpu_has_native_bf16()  # this CPU's own: where the scripts the tests start measure precision


@pytest.fixture(autouse=True)
def one_precision(monkeypatch):
    """The tests' own runs train in float32 on every CPU: on one with bf16 instructions a run
    chooses its precision by timing, and runs that a test compares must train alike. Tests of that
    choice (test_precision) give the CPU its bf16 instructions back."""
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)


# The steps a run takes before its first fold to measure its speed (its time, said at the start):
# tests that count training steps (augmentations, losses) count past them.
CALIBRATION = 2 + 5  # budget.WARMUP_STEPS + budget.CALIBRATION_STEPS, checked by test_time_budget


TINY = ["--folds", "2", "--epochs", "4", "--width", "8", "--batch-size", "16", "--lr", "0.05"]


def shell_env() -> dict[str, str]:
    """A user's shell's environment: without this process's OMP_WAIT_POLICY, which the package sets
    only if it loads before torch."""
    return {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}


def run_python(script: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """A script run as from a user's shell, in a process of its own (one importing torch before the
    package is caught here): for the README's commands as a user types them and for what only a
    process shows; call_python for the rest."""
    env = dict(shell_env(), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert kaggle_cifar.TORCH_LOADED_FIRST not in proc.stderr, f"{script.name} imports torch before kaggle_cifar"
    if check and proc.returncode != 0:
        raise AssertionError(f"{script.name} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def run_script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_python(ROOT / "scripts" / name, *args, check=check)


def call_python(script: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` from the repository's root, run in this process: what the script prints,
    logs and warns, and its exit code, without the 6 s of imports and the teardown a new process
    pays (bench/RESULTS.md). For what a script does; run_python for what only a process of its own
    shows (its import order, a signal, torchrun)."""
    import torch

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level, argv, path = root.handlers[:], root.level, sys.argv, sys.path[:]
    shown = logging.StreamHandler(err)  # cli.run's logging.basicConfig does nothing where pytest's handlers are
    shown.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(shown)
    root.setLevel(logging.INFO)
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))  # as python does for a script: its folder's modules import
    cwd, code = os.getcwd(), 0
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()  # a new interpreter's filters: the warnings a user's terminal shows, in place
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: err.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = argv, path
        os.chdir(cwd)
        root.handlers[:] = handlers
        root.setLevel(level)
        torch._dynamo.reset()  # a new process compiles afresh: no graph kept from an earlier call
    proc = subprocess.CompletedProcess([script.name, *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script.name} exited {code}:\n{proc.stderr[-4000:]}")
    return proc


def call_script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return call_python(ROOT / "scripts" / name, *args, check=check)


def torchrun(script: str, *args: str, launcher: tuple[str, ...] = ("--standalone", "--nproc_per_node=2"),
             env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """A script under torchrun: 2 CPU processes (gloo) on this machine by default, one thread each."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / "scripts" / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def train_and_predict_from_random_timm_weights(tmp_path: Path, timm_name: str, *train_flags: str):
    """A tiny competition trained from a randomly initialised timm checkpoint (standing in for a
    downloaded ImageNet file), then predicted; returns the source network and the run dir."""
    import timm
    import torch

    competition = make_competition(tmp_path / "input", per_class=4, n_test=3)
    torch.manual_seed(0)
    source = timm.create_model(timm_name, pretrained=False)
    torch.save(source.state_dict(), tmp_path / f"{timm_name}.pth")
    run = tmp_path / "run"
    proc = call_script("train_folds.py", "--input", str(competition), "--run-dir", str(run), "--folds", "2",
                       "--batch-size", "4", "--pretrained", str(tmp_path / f"{timm_name}.pth"), *train_flags)
    sub = call_script("predict.py", "--input", str(competition), "--run-dir", str(run)).stdout
    assert len(sub.splitlines()) == 4
    return source, run, proc


# A sitecustomize that runs test code on a module of the package as soon as it loads, in every Python
# process started with hooked_pythonpath's PYTHONPATH: how a test reaches into a torchrun worker or a
# search process. Each patch runs with `module`, `os` and `signal` at hand.
AFTER_IMPORT = """
import importlib.abc, importlib.machinery, os, signal, sys

PATCHES = {patches!r}


class AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            exec(PATCHES[name], {{"module": module, "os": os, "signal": signal}})

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, AfterImport())
"""


def hooked_pythonpath(folder: Path, patches: dict[str, str]) -> str:
    """A PYTHONPATH whose sitecustomize (written into `folder`) applies `patches`: module name ->
    code run on that module once it has loaded."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(AFTER_IMPORT.format(patches=patches))
    return os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", ""), str(ROOT)])
