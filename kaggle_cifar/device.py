"""What depends on the device: which one this process uses, what the installed torch can run on it,
mixed precision, compilation, and moving host rows onto it."""

from __future__ import annotations

import re

import numpy as np
import torch

from kaggle_cifar.errors import ConfigError

TRITON_MIN_CAPABILITY = (7, 0)  # torch.compile's GPU backend (Triton) refuses older GPUs, e.g. the P100 (6.0)
NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores; before it bf16 is emulated, slowly


def select(requested: str | None, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """This process's device. None: its own GPU (LOCAL_RANK) if torch sees one, else the CPU. `cuda`
    is its own GPU too; `cuda:N` pins GPU N, refused when several processes would share it. A GPU
    that the installed torch has no kernels for is refused before any work."""
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


def compile_default(device: torch.device) -> bool:
    """torch.compile by default where its backend runs: GPUs that Triton supports. On the CPU it
    costs minutes of C++ compilation for a short run, so it is opt-in there."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= TRITON_MIN_CAPABILITY


def use_compile(requested: bool | None, device: torch.device) -> bool:
    """--compile / --no-compile, or the device's default."""
    return requested if requested is not None else compile_default(device)


PRECISIONS = ("auto", "float32")
_precision = "auto"


def set_precision(name: str) -> None:
    """auto: the device's mixed precision (autocast_dtype); float32: none, to measure against."""
    global _precision
    if name not in PRECISIONS:
        raise ConfigError(f"--precision {name}: use one of {', '.join(PRECISIONS)}")
    _precision = name


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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision for training and predict: bf16 where the device computes it natively, fp16
    with loss scaling on older GPUs such as Kaggle's T4 and P100, none (float32) on other CPUs or
    when set_precision("float32")."""
    if _precision == "float32" or device.type not in ("cpu", "cuda"):
        return None
    if computes_bf16_natively(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else None


def autocast(device: torch.device) -> torch.autocast:
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def place(model: torch.nn.Sequential, device: torch.device) -> torch.nn.Sequential:
    """`model` (an input layer, then the network) on `device` in channels_last, the layout of cuDNN's
    and oneDNN's fast convolutions (on a CPU too: 1.1-1.4x the NCHW training and 1.6-4.8x its
    forward images/s, bench/RESULTS.md). Except where oneDNN fails in it: on a CPU without AVX-512,
    the backward pass of a strided 1x1 convolution with fewer than 8 input channels (resnet18_cifar
    narrower than --width 8) segfaults or hangs (torch 2.14.1), so such a model runs NCHW
    throughout, from its input layer on, and compiled too: inductor's own layout choice is off."""
    if device.type == "cpu" and "AVX512" not in torch.backends.cpu.get_cpu_capability() and any(
            isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and m.in_channels < 8
            for m in model.modules()):
        from torch._inductor import config as inductor

        inductor.layout_optimization = False
        model[0].channels_last = False
        return model.to(device)
    return model.to(device, memory_format=torch.channels_last)


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
