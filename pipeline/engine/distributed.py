"""torch.distributed for extraction and fine-tuning: which rank this process is, joining
torchrun's process group, and the collectives data-parallel fine-tuning needs (rows gathered
from every rank in rank order, gradients summed or averaged, a list split into rank shards).

Everything here degrades to the single-process case: one rank of one, no communication.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass
class RankInfo:
    """This process's place in a distributed job (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    group: bool = False  # a torch.distributed process group connects the ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def coordination(self) -> str:
        """How the ranks meet: the process group's backend, the filesystem, or not at all."""
        if self.group:
            return str(torch.distributed.get_backend())
        return "filesystem" if self.world > 1 else "none"

    def owned(self, num_shards: int) -> list[int]:
        """The shards this rank writes: every ``world``-th, starting at ``rank``."""
        return list(range(self.rank, num_shards, self.world))


def rank_info() -> RankInfo:
    """Rank and world size from torch.distributed, torchrun or Slurm-style env variables."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return RankInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), True)
    ranks = RankInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    if ranks.world < 1 or not 0 <= ranks.rank < ranks.world:
        raise ValueError(f"RANK={ranks.rank} and WORLD_SIZE={ranks.world} do not describe a "
                         "rank of a job; RANK must be in [0, WORLD_SIZE)")
    return ranks


@contextmanager
def distributed(device: torch.device, timeout_s: float) -> Iterator[RankInfo]:
    """This process's :class:`RankInfo`, joining torchrun's process group when launched by it.

    With WORLD_SIZE > 1 and MASTER_ADDR set (torchrun, or an ``srun`` script that exports it)
    and no process group yet, the default group is initialised (NCCL on GPU, gloo on CPU) and
    destroyed on exit. Without MASTER_ADDR the ranks coordinate through the cache folder.
    """
    started = False
    if (int(os.environ.get("WORLD_SIZE", 1)) > 1 and "MASTER_ADDR" in os.environ
            and torch.distributed.is_available() and not torch.distributed.is_initialized()):
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=timedelta(seconds=timeout_s))
        started = True
    try:
        yield rank_info()
    finally:
        if started:
            torch.distributed.destroy_process_group()


def shard(items: Sequence[T], ranks: RankInfo) -> list[T]:
    """This rank's contiguous part of ``items`` (parts differ in length by one at most);
    concatenating every rank's part in rank order gives ``items`` back."""
    n, world = len(items), ranks.world
    start = ranks.rank * n // world
    return list(items[start:(ranks.rank + 1) * n // world])


def gather_rows(local: torch.Tensor, ranks: RankInfo) -> torch.Tensor:
    """The rows of every rank, concatenated in rank order (ranks may hold different numbers of
    rows). This rank's own rows keep their autograd graph; the other ranks' rows arrive
    without one, so a loss of the gathered rows sends gradients to the local rows only (see
    :func:`sync_gradients` for how the backbone's gradients are combined)."""
    if ranks.world == 1:
        return local
    sizes = torch.zeros(ranks.world, dtype=torch.long, device=local.device)
    sizes[ranks.rank] = len(local)
    torch.distributed.all_reduce(sizes)
    longest = int(sizes.max())
    padded = local.detach().new_zeros((longest, *local.shape[1:]))
    padded[:len(local)] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(ranks.world)]
    torch.distributed.all_gather(parts, padded.contiguous())
    rows = [local if r == ranks.rank else parts[r][:int(sizes[r])] for r in range(ranks.world)]
    return torch.cat(rows)


def sync_gradients(params: Iterable[torch.nn.Parameter], ranks: RankInfo,
                   average: bool) -> None:
    """Sum (or average) the gradients of ``params`` over the ranks, in one flat buffer per
    dtype. A parameter without a gradient on some rank counts as zero there; one without a
    gradient on every rank keeps none (the optimiser skips it, as in one process)."""
    if ranks.world == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8,
                        device=params[0].device)
    torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in (p for p, u in zip(params, used.tolist()) if u):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        torch.distributed.all_reduce(flat)
        if average:
            flat /= ranks.world
        offset = 0
        for p in group:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def broadcast_object(value: T, ranks: RankInfo) -> T:
    """Rank 0's ``value`` on every rank."""
    if ranks.world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def rank_barrier(ranks: RankInfo) -> None:
    """Wait for every rank of the process group (nothing when alone)."""
    if ranks.world > 1 and ranks.group:
        torch.distributed.barrier()


def local_device(device: torch.device) -> torch.device:
    """One GPU per process under torchrun (``LOCAL_RANK``), the given device otherwise."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
