"""torch.distributed under torchrun, and the single-process case as world size 1.

Folds are independent, so with at least as many folds as ranks the ranks split whole folds (fold k
on rank k mod N) and no gradient is all-reduced. With more ranks than folds (a full fit on 2 GPUs),
each fold trains on a group of N // K ranks with DistributedDataParallel, the global batch split
among them (`fold_groups`, `Replicas`). Predictions split shards of the test set over all ranks.
NCCL on GPUs, gloo on CPU (so tests run 2 processes here). Under `torchrun --max-restarts` a failed
rank's whole group is started again and every fold resumes from its last checkpoint."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

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

    @property
    def speaker(self) -> str:
        """`rank 3: ` before a line that one process of several logs; nothing for a process alone."""
        return f"rank {self.rank}: " if self.world_size > 1 else ""

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


@dataclass(frozen=True)
class Replicas:
    """The ranks that train one fold together (DistributedDataParallel): how many, this rank's place
    among them, their process group. Each rank takes its `share` of every global batch; their
    gradients are averaged before every step, so every replica's weights stay the same. The fold's
    files are the first replica's to write. One rank alone is `Replicas()`."""
    size: int = 1
    rank: int = 0
    group: Any = None

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def share(self, rows: int) -> slice:
        """This replica's rows of a global batch of `rows` (a multiple of `size`)."""
        per = rows // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the replicas (in place)."""
        if self.size > 1:
            dist.all_reduce(values, group=self.group)
        return values

    def first(self, value):
        """The first replica's `value` on every replica: a decision one clock makes for the fold."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, group_src=0, group=self.group)
        return box[0]

    def wrap(self, model: torch.nn.Module, device: torch.device, unused_parameters: bool) -> torch.nn.Module:
        """The model's replica: DistributedDataParallel averaging its gradients over the group
        (`unused_parameters`: some weights get no gradient in some steps, as frozen ones); the model
        itself for one rank."""
        if self.size == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, process_group=self.group,
            find_unused_parameters=unused_parameters)


def rank_groups(world_size: int, folds: int) -> list[list[int]]:
    """The groups of ranks that train folds: fold k on group k mod len(groups). One rank each while
    there are at least as many folds as ranks (fold k on rank k mod N), else N // K ranks a fold, as
    many as divide evenly (a rank beyond K groups of them has none)."""
    per_fold = world_size // folds if world_size > folds else 1
    return [list(range(g * per_fold, (g + 1) * per_fold)) for g in range(world_size // per_fold)]


def fold_groups(ctx: "Context", folds: int) -> tuple[list[int], Replicas]:
    """The folds this rank trains (rank_groups) and the replicas it trains them with. Every rank
    calls it: each group's process group is made by all ranks, in one order."""
    groups = rank_groups(ctx.world_size, folds)
    handles = [dist.new_group(ranks, timeout=tensor_timeout(ctx.device)) if len(ranks) > 1 else None
               for ranks in groups]
    mine = next((g for g, ranks in enumerate(groups) if ctx.rank in ranks), None)
    if mine is None:
        log.warning("rank %d: no fold to train (%d ranks over %d folds train %d ranks a fold): use a multiple of %d "
                    "ranks", ctx.rank, ctx.world_size, folds, len(groups[0]), folds)
        return [], Replicas()
    ranks, trained = groups[mine], list(range(mine, folds, len(groups)))
    if len(ranks) > 1 and ctx.rank == ranks[0]:
        log.info("rank %d: fold%s %s on ranks %d-%d (DistributedDataParallel, the batch split %d ways)", ctx.rank,
                 "s" if len(trained) > 1 else "", ", ".join(map(str, trained)), ranks[0], ranks[-1], len(ranks))
    return trained, Replicas(len(ranks), ranks.index(ctx.rank), handles[mine])


def tensor_timeout(device: torch.device) -> timedelta:
    return TENSOR_TIMEOUT if device.type == "cuda" else WAIT_TIMEOUT


def launched_world_size() -> int:
    """How many processes torchrun started for this job (1 without torchrun), known before joining them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str | None = None, precision: str = "auto", compile: bool | None = None, say=log.info) -> Context:
    """Join the torchrun group if launched by torchrun; pick this process's device (see
    device.select) and how it computes there (device.Policy), said in one line (`say`)."""
    world_size = launched_world_size()
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
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=tensor_timeout(device))
        if dist.get_backend() != "gloo":
            wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    policy = devices.Policy.of(device, precision, compile)
    ctx = Context(rank, world_size, policy, wait_group)
    say(ctx.speaker + policy.describe())
    return ctx


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
