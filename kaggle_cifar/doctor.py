"""The first command on a new machine: versions, the device and what the installed torch can do on
it, then a short training and predict probe on synthetic data that measures what a run depends on
(one compiled graph, no host sync per step, images/s, device memory), one verdict line per check."""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kaggle_cifar import device as devices
from kaggle_cifar import distributed, probe
from kaggle_cifar.augment import TTA_VIEWS
from kaggle_cifar.budget import CALIBRATION_STEPS, fastest_precision
from kaggle_cifar.config import RECIPES, TrainConfig, human_duration
from kaggle_cifar.cv import check_input
from kaggle_cifar.errors import EXPECTED_ERRORS
from kaggle_cifar.folds import FoldData
from kaggle_cifar.inference import batch_probs, stream_probs
from kaggle_cifar.probe import GiB
from kaggle_cifar.train import build_training, evaluate, train_step


@dataclass
class Verdict:
    check: str
    problem: str | None = None  # None: ok

    def __str__(self) -> str:
        return f"{'ok' if self.problem is None else 'FAIL':<5} {self.check}" + (f": {self.problem}" if self.problem else "")


def synthetic_fold(n: int, device: torch.device, classes: int = 10) -> FoldData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g).to(device)
    targets = torch.randint(0, classes, (n,), generator=g).to(device)
    return FoldData(0, [str(c) for c in range(classes)], torch.full((3,), 120.0, device=device),
                    torch.full((3,), 64.0, device=device), images, targets, images[: n // 4], targets[: n // 4],
                    images[:0])


def versions() -> str:
    import timm
    import torchvision

    cuda = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if torch.version.cuda else "CPU-only build"
    return (f"python {platform.python_version()}, torch {torch.__version__} ({cuda}), "
            f"torchvision {torchvision.__version__}, timm {timm.__version__}")


def describe_gpu(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    major, minor = torch.cuda.get_device_capability(device)
    return f"{device} {props.name}, compute capability {major}.{minor}, {props.total_memory / GiB:.1f} GiB"


def timed(fn, device: torch.device) -> float:
    devices.synchronize(device)
    t0 = time.perf_counter()
    fn()
    devices.synchronize(device)
    return time.perf_counter() - t0


@dataclass
class Probe:
    """Synthetic training data and one batch of it, at the sizes this device is probed with."""
    cfg: TrainConfig
    policy: devices.Policy
    data: FoldData
    x: torch.Tensor
    y: torch.Tensor
    steps: int  # timed steps

    @property
    def device(self) -> torch.device:
        return self.policy.device

    @classmethod
    def on(cls, policy: devices.Policy) -> "Probe":
        # The CPU takes minutes at full size: the same checks, smaller.
        on_gpu = policy.device.type == "cuda"
        cfg = TrainConfig() if on_gpu else TrainConfig(width=16, batch_size=64)
        data = synthetic_fold(8 * cfg.batch_size, policy.device)
        return cls(cfg, policy, data, data.train_images[:cfg.batch_size].permute(0, 3, 1, 2).contiguous(),
                   data.train_targets[:cfg.batch_size], 10 if on_gpu else 4)

    def images_per_s(self, t) -> float:
        return self.steps * self.cfg.batch_size / timed(
            lambda: [train_step(t, self.x, self.y, 100 + s) for s in range(self.steps)], self.device)


def run(requested_device: str | None, input_dir: Path | None, cache_dir: Path | None, say=print,
        precision: str = "auto") -> list[Verdict]:
    """The checks, on the device and with the settings a training run of this process would use
    (distributed.setup: cuDNN's autotuning and TF32 on a GPU)."""
    say(versions())
    try:
        ctx = distributed.setup(requested_device, precision, say=say)  # in the report, not the log as well
    except EXPECTED_ERRORS as e:
        return [Verdict("device and torch build", str(e))]
    device = ctx.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        say(f"device: {describe_gpu(device)}; this torch has kernels for {', '.join(torch.cuda.get_arch_list())}")
        if not ctx.policy.compile_training:
            say("torch.compile is off by default here: Triton needs compute capability 7.0")
    p = Probe.on(ctx.policy)
    verdicts = [Verdict("device and torch build"), check_compiled(p, say), *check_eager(p, say), check_memory(device, say)]
    say_how_long_runs_take(ctx.policy, say)
    if input_dir is not None:
        verdicts.append(check_files(input_dir, cache_dir, say))
    return verdicts


def check_compiled(p: Probe, say) -> Verdict:
    """Two epochs of a few compiled steps with evaluation between, then a second fold's model:
    one graph, no break, no recompile."""
    on_gpu = p.device.type == "cuda"
    backend = "inductor" if on_gpu else "aot_eager"
    say(f"probe on synthetic data: width {p.cfg.width}, batch {p.cfg.batch_size}"
        + ("" if on_gpu else " (reduced on the CPU; the default run is width 64, batch 128)")
        + f"; compile backend {backend}" + ("" if on_gpu else " (graph breaks and recompiles do not depend on it)"))
    probe.reset_compile_counts()
    t0 = time.perf_counter()
    compiled = dataclasses.replace(p.policy, compile=True)
    for fold in range(2):
        t = build_training(p.cfg, p.data, compiled, backend=backend)
        for epoch in range(2 if fold == 0 else 1):
            t.model.train()
            for step in range(3):
                train_step(t, p.x, p.y, epoch * 3 + step + 1)
            evaluate(t.eval_model, p.data.val_images, p.data.val_targets, p.policy)
    devices.synchronize(p.device)
    counts = probe.compile_counts()
    say(f"compiled step: {counts.graphs} graph(s), {sum(counts.graph_breaks.values())} graph break(s), "
        f"{counts.recompiles} recompile(s) over 2 epochs, evaluation and a second fold "
        f"({time.perf_counter() - t0:.0f} s with compilation)")
    if on_gpu:  # on the CPU the probe's backend checks graphs, it is no measure of speed
        say(f"training, compiled: {p.images_per_s(t):,.0f} images/s")
    return Verdict("compiled step: one graph, no break, no recompile", None if counts.clean else
                   f"{counts}; a GPU run loses speed: run with --no-compile and report it")


def check_eager(p: Probe, say) -> list[Verdict]:
    """Host syncs per training step and per predict batch, the fp16 overflow skip, images/s."""
    verdicts = []
    eager = build_training(p.cfg, p.data, dataclasses.replace(p.policy, compile=False))
    train_step(eager, p.x, p.y, 1)
    with probe.HostSyncs(on_host=probe.host_step_counters(eager.optimizer)) as step_syncs:
        for s in range(3):
            train_step(eager, p.x, p.y, s + 2)
    expected = 3 * eager.host_syncs_per_step
    say(f"training, eager: {p.images_per_s(eager):,.0f} images/s")
    if eager.scaler.is_enabled():
        clean = probe.overflow_step_changes_nothing(eager, p.x, p.y, 20)
        say(f"fp16 overflow step: {'skipped, weights and optimizer state untouched' if clean else 'CHANGED the state'}")
        verdicts.append(Verdict("fp16 loss scaling skips an overflowing step cleanly", None if clean else
                                "this torch's fused optimizer updated its state on a skipped step: "
                                "report it, and train with --optimizer lamb until it is fixed"))
    model = eager.model.eval()
    with probe.HostSyncs() as predict_syncs, torch.no_grad():
        batch_probs([model], p.x, TTA_VIEWS["flip"], p.policy)
    say(f"host syncs: {step_syncs.count / 3:g} per training step, {predict_syncs.count} per predict batch")
    verdicts.append(Verdict("no host sync in a training step (but fp16's with an unfused optimizer) or a predict batch",
                            None if step_syncs.count == expected and predict_syncs.count == 0 else
                            f"syncs {step_syncs.ops} per 3 steps, {predict_syncs.ops} per batch: report it"))
    images = p.data.train_images.repeat(4, 1, 1, 1)
    seconds = timed(lambda: stream_probs([model], images, TTA_VIEWS["none"], p.policy), p.device)
    say(f"predict: {len(images) / seconds:,.0f} images/s per view and fold")
    return verdicts


def say_how_long_runs_take(policy: devices.Policy, say) -> None:
    """The default run's time on the full competition here, and the fast recipes' per epoch, from a
    few steps of each at full size on synthetic images (50,000 training images: 40,000 a fold). On
    a CPU a step takes seconds, long enough to time alone: one timed step after the warm-up rather
    than a run's five, which would make the doctor minutes longer there."""
    timed_steps = CALIBRATION_STEPS if policy.device.type == "cuda" else 1
    for name, what in [("resnet18", "the default run (5 folds x 30 epochs, ResNet18 width 64)"),
                       ("fast", "the fast recipe (--recipe fast: one fast_cifar on 50,000 images)"),
                       ("fast_wide", "the wide fast recipe (--recipe fast_wide: fast at width 96, label smoothing 0.2)")]:
        cfg = dataclasses.replace(TrainConfig(), recipe=name, **RECIPES[name])
        train_images = 50_000 * (cfg.folds - 1) // cfg.folds if cfg.folds > 1 else 50_000
        held_out = 50_000 - train_images
        fastest, speed = fastest_precision(cfg, synthetic_fold(4 * cfg.batch_size, policy.device), policy,
                                           train_images, (held_out, 0), steps=timed_steps)
        at = f"({fastest.precision}, {speed.images_per_s:,.0f} images/s)"
        if cfg.full_fit:
            say(f"{what}: {human_duration(speed.epoch_s)} an epoch here {at}; give it the --time-budget you have")
        else:
            say(f"{what}: about {human_duration(speed.run_seconds(cfg.folds, cfg.epochs))} here {at}")


def check_memory(device: torch.device, say) -> Verdict:
    estimate = probe.estimate_memory(TrainConfig(), train_images=50_000)
    line = (f"device memory of the default run (50,000 images, width 64, batch 128), estimated: "
            f"{estimate.total / GiB:.2f} GiB (images {estimate.images / GiB:.2f}, weights and optimizer "
            f"{estimate.weights / GiB:.2f}, activations {estimate.activations / GiB:.2f})")
    problem = None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        line += f"; this probe's peak: {torch.cuda.max_memory_allocated(device) / GiB:.2f} GiB of {total / GiB:.1f}"
        if estimate.total > 0.9 * total:
            problem = "the default run may not fit: lower --batch-size"
    say(line)
    return Verdict("memory", problem)


def check_files(input_dir: Path, cache_dir: Path, say) -> Verdict:
    try:
        say(check_input(input_dir, cache_dir, TrainConfig().folds))
        return Verdict(f"competition files in {input_dir}")
    except EXPECTED_ERRORS as e:
        return Verdict(f"competition files in {input_dir}", str(e))
