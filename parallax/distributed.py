"""Process-group setup from the environment that ``torchrun`` (or ``parallax train --nproc``) sets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_from_env", "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR (gloo on CPU, NCCL on CUDA).

    A single process (no WORLD_SIZE, or 1) gets a process group of its own (world size 1), so
    the same ZeRO code runs. ``timeout_s`` bounds every collective, so a dead rank makes the
    others fail with an error instead of hanging.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        timeout = timedelta(seconds=timeout_s)
        if world <= 1:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def shutdown() -> None:
    """Leave the process group, after a barrier that lets the backend finish its last collectives."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
