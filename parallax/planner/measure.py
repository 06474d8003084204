"""Measured peak memory of CPU code: every allocation and free of torch's CPU allocator, in order.

``tracemalloc`` does not see torch's CPU allocator, and sampling tensors at hook points misses
what lives between the samples (an op's output and its inputs, a gradient before the reducer
copies it). ``torch.profiler`` with ``profile_memory=True`` records one ``[memory]`` event per
allocation (+bytes) and per free (-bytes) made by the profiled thread; summing them in time order
gives the live bytes after every allocation, hence the exact peak::

    with CpuMemoryProfile() as prof:
        model = build(); opt = ...          # allocated inside: counted from here on
        train_step()                         # warm-up (optimizer state appears)
        with prof.window("step"):
            train_step()                     # the step whose peak we want
    peak, where = prof.peak("step")          # live bytes at the step's highest point

Only allocations made while the profiler runs are known to it (it ignores the free of a block
it never saw allocated), so build what should be counted inside the profile. Allocations on
other threads (gloo's communication threads, OpenMP workers) and inside libraries with their own
allocators (oneDNN/MKL scratch) are not torch CPU allocator calls on this thread and are not
counted. ``prof.phase(name)`` marks sub-ranges (forward, backward, ...) so that ``peak`` can say
where the highest point was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["CpuMemoryProfile"]

_PREFIX = "parallax.measure."


class CpuMemoryProfile:
    def __init__(self) -> None:
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
        self._memory: list[tuple[int, int]] = []  # (time ns, signed bytes)
        self._ranges: list[tuple[str, int, int]] = []  # (name, start ns, end ns)

    def __enter__(self) -> CpuMemoryProfile:
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        memory, ranges = [], []
        for e in self._prof.profiler.kineto_results.events():
            name = e.name()
            if name == "[memory]":
                memory.append((e.start_ns(), int(e.nbytes())))
            elif name.startswith(_PREFIX):
                ranges.append((name[len(_PREFIX):], e.start_ns(), e.end_ns()))
        memory.sort(key=lambda m: m[0])
        self._memory, self._ranges = memory, ranges

    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[None]:
        """Mark a range of the program (a step, a phase) to ask ``peak`` about later."""
        with record_function(_PREFIX + name):
            yield

    phase = window

    def _range(self, name: str) -> tuple[int, int]:
        found = [(s, e) for n, s, e in self._ranges if n == name]
        if not found:
            raise KeyError(f"no window named {name!r} was recorded")
        return found[-1]

    def live_at(self, t_ns: int) -> int:
        """Bytes allocated inside the profile and still alive at time ``t_ns``."""
        return sum(b for t, b in self._memory if t < t_ns)

    def peak(self, window: str | None = None) -> tuple[int, str | None]:
        """(highest live bytes, the innermost other window it fell in) over ``window`` (default: all).

        Live bytes count everything allocated since the profile started and not yet freed.
        """
        lo, hi = self._range(window) if window is not None else (-1, 2**63)
        live, peak, when = 0, 0, None
        for t, nbytes in self._memory:
            live += nbytes
            if lo <= t <= hi and live > peak:
                peak, when = live, t
        where = None
        if when is not None:
            inside = [(e - s, n) for n, s, e in self._ranges if s <= when <= e and n != window]
            where = min(inside)[1] if inside else None
        return peak, where

