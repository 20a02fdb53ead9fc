"""torch.distributed under torchrun, and the single-process case as world size 1.

Folds are independent, so ranks split whole folds (fold i on rank i mod N) and shards of the test
set; no gradient is ever all-reduced. NCCL on GPUs, gloo on CPU (so tests run 2 processes here).
Under `torchrun --max-restarts` a failed rank's whole group is started again and every fold resumes
from its last checkpoint."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kaggle_cifar import device as devices
from kaggle_cifar.errors import ConfigError

log = logging.getLogger(__name__)

# Ranks wait on each other's host work: rank 0 unpacking 350,000 files or decoding the cache, and,
# when the folds do not divide evenly over the ranks, a whole fold at the final barrier. Those waits
# go through a gloo group with this timeout; NCCL (GPU tensors only) keeps a shorter one, since its
# collectives start together.
WAIT_TIMEOUT = timedelta(hours=24)
TENSOR_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    policy: devices.Policy  # this process's device and how it computes there
    wait_group: object = None  # the process group barriers use (None: the default group)

    @property
    def device(self) -> torch.device:
        return self.policy.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.wait_group)

    def smallest(self, value: float) -> float:
        """The smallest of every rank's `value` (each rank calls it once): a plan the ranks share."""
        if self.world_size == 1:
            return value
        agreed = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.wait_group)
        return float(agreed.item())

    def main_rank_first(self, fn):
        """`fn()` on rank 0 first (it builds what is shared on disk: the image cache), then on the
        rest. If rank 0 fails, torchrun ends the other ranks."""
        if self.is_main:
            result = fn()
        self.barrier()
        return result if self.is_main else fn()


def setup(device: str | None = None, precision: str = "auto", compile: bool | None = None) -> Context:
    """Join the torchrun group if launched by torchrun; pick this process's device (see
    device.select) and how it computes there (device.Policy)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Workers restarted on torchrun's shared rendezvous store: of 3 restarts in a row after a killed
        # rank (torch 2.14.1, gloo) one failed to connect and two hung; with a store of their own for
        # each attempt, 3 of 3 resumed (bench/RESULTS.md).
        raise ConfigError("torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
                          "environment: on torchrun's shared store a restarted process group can fail to connect or "
                          "hang; e.g. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts 3 ...")
    device = devices.select(device, local_rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Batch shapes are fixed (training drops the last partial batch), so cuDNN's per-shape
        # autotuning is paid once; TF32 covers whatever runs outside bf16 autocast.
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    wait_group = None
    if world_size > 1:
        if not dist.is_initialized():
            gpu = device.type == "cuda"
            dist.init_process_group("nccl" if gpu else "gloo", timeout=TENSOR_TIMEOUT if gpu else WAIT_TIMEOUT)
        if dist.get_backend() != "gloo":
            wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    policy = devices.Policy.of(device, precision, compile)
    log.info("%s%s", f"rank {rank}: " if world_size > 1 else "", policy.describe())
    return Context(rank, world_size, policy, wait_group)


def teardown(ctx: Context) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, ctx: Context) -> slice:
    """This rank's contiguous share of n rows."""
    per = -(-n // ctx.world_size)
    return slice(min(n, ctx.rank * per), min(n, (ctx.rank + 1) * per))


def gather_rows(local: torch.Tensor, n: int, ctx: Context) -> torch.Tensor:
    """Concatenate every rank's `shard` of an (n, ...) tensor, on every rank."""
    if ctx.world_size == 1:
        return local
    per = -(-n // ctx.world_size)
    padded = torch.zeros((per, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:n]
