"""How much memory one rank may plan for when the user says ``device_bytes="auto"``."""

from __future__ import annotations

import os

import torch

__all__ = ["device_memory_bytes"]


def device_memory_bytes(device: torch.device | str | None = None, local_ranks: int | None = None) -> int:
    """Memory of one rank's device, in bytes.

    CUDA: the device's total memory (``torch.cuda.get_device_properties``; what nvidia-smi shows
    as total, in bytes). CPU: the machine's physical memory divided by the ranks that share it
    (``local_ranks``, default ``LOCAL_WORLD_SIZE`` from torchrun or 1); CPU ranks of one host
    share its RAM. ``device`` defaults to CUDA when torch sees one, else the CPU.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device_bytes='auto' for a CUDA device, but torch sees no CUDA device")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    if device.type != "cpu":
        raise ValueError(f"device_bytes='auto' knows CUDA and CPU devices, not {device.type!r}; give a size")
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_ranks < 1:
        raise ValueError(f"local_ranks must be >= 1, got {local_ranks}")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total // local_ranks)
