"""Timing for benchmarks: warmup, repeated measurements, median with p20/p80.

Memory-bound timings on a shared CPU swing by up to 2x between runs, so providers that are
compared must be measured *interleaved* in one process: ``interleave({"a": fa, "b": fb})``
calls them round-robin (a, b, a, b, ... with the starting provider rotated every round) and
reports each one's median. ``measure(fn)`` is the one-provider case.

On CUDA each call is bracketed by CUDA events and the device is synchronized once at the end;
on CPU by ``time.perf_counter``. A ``CacheFlusher`` passed as ``flush`` runs (untimed) before
every timed call so that each call starts with cold caches, as an optimizer step does after a
backward pass.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["Timing", "CacheFlusher", "interleave", "measure", "synchronize", "quantile"]


def quantile(values: list[float] | tuple[float, ...], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of ``values`` with linear interpolation (numpy's default)."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls of one function, in seconds."""

    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return quantile(self.times_s, 0.5)

    @property
    def p20_s(self) -> float:
        return quantile(self.times_s, 0.2)

    @property
    def p80_s(self) -> float:
        return quantile(self.times_s, 0.8)

    @property
    def median_ms(self) -> float:
        return 1e3 * self.median_s

    @property
    def p20_ms(self) -> float:
        return 1e3 * self.p20_s

    @property
    def p80_ms(self) -> float:
        return 1e3 * self.p80_s

    @property
    def n(self) -> int:
        return len(self.times_s)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class CacheFlusher:
    """Evicts the last-level cache by reading a buffer several times larger than it.

    Reading only: the cache is left holding clean lines, whose eviction during the timed call
    costs no write-back traffic (a writing flush would bill up to a cache's worth of dirty
    write-backs to the next call).
    """

    def __init__(self, device: torch.device | str = "cpu", nbytes: int | None = None) -> None:
        device = torch.device(device)
        if nbytes is None:
            nbytes = max(4 * _last_level_cache_bytes(device), 64 << 20)
        self.nbytes = nbytes
        self._buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self._buf.sum()


def _last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))
    try:  # Linux sysfs: the highest cache level of cpu0
        from pathlib import Path

        caches = Path("/sys/devices/system/cpu/cpu0/cache")
        sizes = []
        for index in caches.glob("index*"):
            text = (index / "size").read_text().strip()
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
        return max(sizes)
    except (OSError, ValueError):
        return 32 << 20


def interleave(
    fns: Mapping[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeat: int | None = None,
    budget_s: float = 2.0,
    min_repeat: int = 5,
    max_repeat: int = 100,
    flush: Callable[[], object] | None = None,
) -> dict[str, Timing]:
    """Time every function in ``fns`` round-robin; returns name -> Timing.

    Every function runs ``warmup`` untimed rounds, then ``repeat`` timed rounds; every function
    is called the same number of times in total. When ``repeat`` is None it is chosen so that
    the timed rounds take about ``budget_s`` seconds, within [min_repeat, max_repeat].
    """
    if not fns:
        return {}
    names = list(fns)
    device = torch.device(device)

    start = time.perf_counter()
    for _ in range(warmup):
        for name in names:
            if flush is not None:
                flush()
            fns[name]()
    synchronize(device)
    if repeat is None:
        per_round = (time.perf_counter() - start) / max(warmup, 1) if warmup else budget_s / min_repeat
        repeat = int(min(max(budget_s / max(per_round, 1e-9), min_repeat), max_repeat))

    times: dict[str, list[float]] = {name: [] for name in names}
    events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeat):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                if flush is not None:
                    flush()
                if device.type == "cuda":
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    fns[name]()
                    end.record()
                    events[name].append((begin, end))
                else:
                    t0 = time.perf_counter()
                    fns[name]()
                    times[name].append(time.perf_counter() - t0)
        synchronize(device)
    finally:
        if gc_was_enabled:
            gc.enable()
    if device.type == "cuda":
        times = {name: [1e-3 * b.elapsed_time(e) for b, e in pairs] for name, pairs in events.items()}
    return {name: Timing(tuple(times[name])) for name in names}


def measure(fn: Callable[[], object], **kwargs) -> Timing:
    """Time one function (same keywords as ``interleave``)."""
    return interleave({"fn": fn}, **kwargs)["fn"]
