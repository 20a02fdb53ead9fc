"""What depends on the device: which one this process uses, what the installed torch can run on it,
and how this process computes on it (`Policy`: mixed precision, compilation, layout), and moving
host rows onto it."""

from __future__ import annotations

import dataclasses
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kaggle_cifar.config import PRECISIONS
from kaggle_cifar.errors import ConfigError

TRITON_MIN_CAPABILITY = (7, 0)  # torch.compile's GPU backend (Triton) refuses older GPUs, e.g. the P100 (6.0)
# ResNet18's 21 weight updates in 3 padded batches: 70 ops a Muon step (12 batches unpadded: 250) for
# 18% more Newton-Schulz FLOPs (optim.partition); 4 batches: 90 ops, 7% more.
GPU_MUON_BUCKETS = 3
NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores; before it bf16 is emulated, slowly


def select(requested: str | None, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """This process's device. None: its own GPU (LOCAL_RANK) if torch sees one, else the CPU. `cuda`
    is its own GPU too; `cuda:N` pins GPU N, refused when several processes would share it. A GPU
    that the installed torch has no kernels for is refused before any work."""
    if requested is None and not torch.cuda.is_available() and nvidia_gpu_visible():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"an NVIDIA GPU is visible here but torch {torch.__version__} ({build}) cannot use it, "
                          f"so this run would train on the CPU for days: install a torch build for its driver "
                          f"(nvidia-smi shows the CUDA version the driver supports), or give --device cpu")
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"--device {requested}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"--device {requested}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"--device {requested}: torch sees no CUDA GPU here (torch {torch.__version__}, {build}); "
                          f"use --device cpu, or check the driver with nvidia-smi")
    if device.index is None:
        device = torch.device("cuda", local_rank)
    elif world_size > 1:
        raise ConfigError(f"--device {requested} under torchrun with {world_size} processes puts every process on "
                          f"GPU {device.index}, which NCCL refuses; use --device cuda (each process takes GPU LOCAL_RANK)")
    if device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine shows {torch.cuda.device_count()} GPU(s), "
                          f"numbered from 0")
    problem = kernel_problem(torch.cuda.get_device_capability(device), torch.cuda.get_arch_list())
    if problem:
        raise ConfigError(f"{torch.cuda.get_device_name(device)} ({device}): {problem}")
    return device


def nvidia_gpu_visible() -> bool:
    """An NVIDIA GPU's device file, or its driver's tool, is on this machine."""
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def kernel_problem(capability: tuple[int, int], arch_list: list[str]) -> str | None:
    """Why the installed torch cannot run on a GPU of this compute capability, or None if it can.
    A binary built for sm_XY runs on the same major version from minor Y up; PTX (compute_XY)
    is compiled by the driver for any later GPU."""
    have = capability[0] * 10 + capability[1]
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        built = int(re.match(r"\d+", number).group()) if re.match(r"\d+", number) else None
        if built is None:
            continue
        if (kind == "sm" and built // 10 == have // 10 and built <= have) or (kind == "compute" and built <= have):
            return None
    return (f"compute capability {capability[0]}.{capability[1]} has no kernels in this torch {torch.__version__} "
            f"(built for {', '.join(arch_list) or 'no GPU'}); install a torch build that lists sm_{have} "
            f"(see README, 'Which GPUs')")


# On a 2-core CPU compiling a model for inference took 10-17 s and its forward pass then ran about
# 1.4x eager's (bench/RESULTS.md): that repays itself after some tens of thousands of images, so sets
# this large (a test set, a full-data fold's OOF and holdout views) are compiled, smaller ones not.
COMPILE_MIN_FORWARDS = 100_000


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 convolutions run on the CPU's own bf16 instructions (oneDNN)."""
    cpu = torch.cpu
    return any(getattr(cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def computes_bf16_natively(device: torch.device) -> bool:
    """GPUs from Ampere on; CPUs with AVX-512 BF16 or AMX. Elsewhere bf16 is emulated: on an AVX2 CPU
    a bf16 matmul took about 20x the float32 one's time (bench/RESULTS.md)."""
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY


def triton_runs_on(device: torch.device) -> bool:
    """torch.compile's GPU backend (Triton) supports this GPU."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= TRITON_MIN_CAPABILITY


@dataclass(frozen=True)
class Policy:
    """How this process computes, chosen once from the flags (`Policy.of`) and passed down to
    whatever runs a model: the device, mixed precision and loss scaling, torch.compile for training
    and for inference, Muon's Newton-Schulz dtype, the memory layout. Nothing here is global."""
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: float32 throughout
    newton_schulz_dtype: torch.dtype    # Muon's orthogonalisation of its updates
    compile: bool | None = None         # --compile / --no-compile; None: compile_training/compiles_inference decide
    # bf16 or float32, whichever trains faster here as measured (budget.fastest_precision) rather
    # than from the CPU's capability: on this project's Intel Xeon bf16 trained 1.6x float32's
    # images/s alone, and 0.1-0.4x with another process beside it.
    measure_precision: bool = False
    # How many batches Muon orthogonalises its updates in (optim.Muon). A GPU with bf16 tensor cores
    # does a step's arithmetic in about the time the host takes to launch its kernels, so there few
    # batches, padded: fewer launches for a little more arithmetic. Elsewhere the arithmetic is the
    # cost (a T4's or P100's fp16, a CPU's): None, one batch per weight shape, unpadded. README's GPU
    # estimates give the arithmetic of both.
    muon_buckets: int | None = None

    @classmethod
    def of(cls, device: torch.device, precision: str = "auto", compile: bool | None = None) -> "Policy":
        """auto: bf16 where the device computes it natively (on such a CPU, bf16 or float32 as
        measured, unless training is compiled: a compilation each would cost minutes), fp16 with
        loss scaling on older GPUs (Kaggle's T4 and P100), float32 on other CPUs; bf16: bf16 autocast,
        where it is native; float32: none, the reference to measure against."""
        if precision not in PRECISIONS:
            raise ConfigError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
        native = computes_bf16_natively(device)
        if precision == "bf16" and not native:
            raise ConfigError(f"--precision bf16: {device} has no bf16 arithmetic of its own (Ampere and later GPUs, "
                              "CPUs with AVX-512 BF16 or AMX), so it would be emulated, slowly: use --precision auto")
        buckets = GPU_MUON_BUCKETS if native and device.type == "cuda" else None
        if precision == "float32" or (not native and device.type != "cuda"):
            return cls(device, None, torch.float32, compile, muon_buckets=buckets)
        if not native:  # Muon's Newton-Schulz in fp16 too: its input is normalised, and tensor cores compute fp16
            return cls(device, torch.float16, torch.float16, compile)
        measure = precision == "auto" and device.type == "cpu" and not compile
        return cls(device, torch.bfloat16, torch.bfloat16, compile, measure, buckets)

    def precision_candidates(self) -> tuple["Policy", ...]:
        """The policies a measurement chooses between (bf16 first), or this one alone."""
        if not self.measure_precision:
            return (self,)
        return (dataclasses.replace(self, autocast_dtype=torch.bfloat16, newton_schulz_dtype=torch.bfloat16),
                dataclasses.replace(self, autocast_dtype=None, newton_schulz_dtype=torch.float32))

    @property
    def precision(self) -> str:
        """What the model computes in: "bf16 autocast", "float32" or "fp16 + loss scaling"."""
        return {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 + loss scaling"}[self.autocast_dtype]

    @property
    def loss_scaling(self) -> bool:
        """fp16's range is small: its gradients need GradScaler; bf16's and float32's do not."""
        return self.autocast_dtype == torch.float16

    @property
    def compile_training(self) -> bool:
        """The training step is compiled where Triton runs; on the CPU it costs minutes of C++
        compilation for a short run, so it is opt-in there."""
        return self.compile if self.compile is not None else triton_runs_on(self.device)

    def compiles_inference(self, forwards: int) -> bool:
        """A model that predicts `forwards` image views is compiled on the CPU when that repays the
        compilation; GPUs predict eagerly by default (not measured there)."""
        if self.compile is not None:
            return self.compile
        return self.device.type == "cpu" and forwards >= COMPILE_MIN_FORWARDS

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` (an InputLayer's network) on the device in channels_last, the layout of cuDNN's
        and oneDNN's fast convolutions (on a CPU too: 1.1-1.4x the NCHW training and 1.6-4.8x its
        forward images/s, bench/RESULTS.md). Except where oneDNN fails in it: the backward pass of a
        strided 1x1 convolution with at most 8 input channels (resnet18_cifar up to --width 8)
        segfaults or hangs (torch 2.14.1): on an AVX2 CPU below 8 channels, on the AVX-512 Zen 4 at 8
        and at 4 from 48 pixels on (an --image-size), so such a model runs NCHW throughout, from its
        input layer on (and compiled so: see `compiled`)."""
        if not channels_last_is_safe(self.device, model):
            model.input.channels_last = False
            return model.to(self.device)
        return model.to(self.device, memory_format=torch.channels_last)

    def compiled(self, model: torch.nn.Module, backend: str = "inductor", wrapper: torch.nn.Module | None = None,
                 **kwargs) -> torch.nn.Module:
        """torch.compile of a placed model (or of `wrapper`, its DistributedDataParallel); a model
        kept NCHW keeps inductor from choosing channels_last for it (an option of this one
        compilation, not of the process)."""
        if backend == "inductor" and not model.input.channels_last:
            kwargs["options"] = {**kwargs.get("options", {}), "layout_optimization": False}
        return torch.compile(wrapper if wrapper is not None else model, backend=backend, **kwargs)

    def where(self) -> str:
        """`cpu (AMD EPYC, 2 threads)`, `cuda:0 (Tesla T4, 7.5)`."""
        if self.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(self.device)
            return f"{self.device} ({torch.cuda.get_device_name(self.device)}, {major}.{minor})"
        threads = torch.get_num_threads()
        return f"{self.device} ({cpu_name()}, {threads} thread{'s' if threads > 1 else ''})"

    def describe(self) -> str:
        """One line for the start of every script: `device cpu (AMD EPYC, 2 threads), bf16 autocast, eager`."""
        where = self.where()
        precision = "bf16 autocast or float32, the faster as measured" if self.measure_precision else self.precision
        inference = {True: "compiled", False: "eager"}.get(
            self.compile, "compiled for large sets" if self.device.type == "cpu" else "eager")
        return (f"device {where}, {precision}, training {'compiled' if self.compile_training else 'eager'}, "
                f"inference {inference}")


def channels_last_is_safe(device: torch.device, model: torch.nn.Module) -> bool:
    """False where oneDNN fails in channels_last (see Policy.place)."""
    return not (device.type == "cpu" and any(
        isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and m.in_channels <= 8
        for m in model.modules()))


def cpu_name() -> str:
    """The CPU's model name as lscpu gives it (the figures in bench/RESULTS.md name it too)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return platform.processor() or "cpu"


def to_device(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of (memory-mapped, read-only) host rows as a tensor on `device`. To a GPU the copy
    goes through pinned memory, asynchronously: the caller may queue work behind it at once."""
    host = torch.from_numpy(np.array(rows))
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
