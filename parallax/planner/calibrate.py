"""This machine's rates for the step-time model (``parallax.planner.cost.Hardware``).

* ``matmul_flops_per_s``: the sustained rate of an n x n x n matmul (2 n^3 FLOPs) in a dtype.
* ``time_all_reduce``: the median time of an all-reduce of a given size in the current process
  group (call it on every rank);
* ``fit_ring_all_reduce``: latency and bandwidth of the ring model
  ``t = 2 (n-1) latency + 2 (n-1)/n bytes / bandwidth`` fitted to such times (least squares of
  the relative error, so that small and large sizes count alike), i.e. ``Hardware.latency_s``
  and ``network_bytes_per_s``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["matmul_flops_per_s", "time_all_reduce", "fit_ring_all_reduce"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(n: int = 1024, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       repeats: int = 5) -> float:
    """Median FLOP/s of ``a @ b`` for (n, n) matrices (one untimed warm-up call)."""
    device = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def time_all_reduce(nbytes: int, repeats: int = 5, group: dist.ProcessGroup | None = None,
                    device: str | torch.device = "cpu") -> float:
    """Median seconds of a sum all-reduce of ``nbytes`` (fp32) in ``group``; every rank calls it.
    A barrier before each call starts the ranks together."""
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    dist.all_reduce(x, group=group)
    times = []
    for _ in range(repeats):
        dist.barrier(group=group)
        start = time.perf_counter()
        dist.all_reduce(x, group=group)
        _sync(torch.device(device))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fit_ring_all_reduce(sizes: Sequence[float], times: Sequence[float], world: int) -> tuple[float, float]:
    """(latency_s, bytes_per_s) of the ring model fitted to all-reduce ``times`` of ``sizes`` bytes
    over ``world`` ranks; at least two distinct sizes."""
    if world < 2:
        raise ValueError(f"world must be >= 2 to fit an all-reduce, got {world}")
    if len(sizes) != len(times) or len(set(sizes)) < 2:
        raise ValueError("fit_ring_all_reduce needs times of at least two distinct sizes")
    xs = [2 * (world - 1) / world * s for s in sizes]
    # minimise sum(((a + c x - t) / t)^2): weighted least squares with weights 1 / t^2
    ws = [1.0 / t**2 for t in times]
    total = sum(ws)
    mean_x = sum(w * x for w, x in zip(ws, xs)) / total
    mean_t = sum(w * t for w, t in zip(ws, times)) / total
    slope = (sum(w * (x - mean_x) * (t - mean_t) for w, x, t in zip(ws, xs, times))
             / sum(w * (x - mean_x) ** 2 for w, x in zip(ws, xs)))
    if slope <= 0:
        raise ValueError("all-reduce times do not grow with the size: cannot fit a bandwidth (too noisy?)")
    intercept = max(0.0, mean_t - slope * mean_x)
    return intercept / (2 * (world - 1)), 1.0 / slope
