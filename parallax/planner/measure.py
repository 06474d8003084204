"""Measured peak memory of CPU code: every allocation and free of torch's CPU allocator, in order.

``tracemalloc`` does not see torch's CPU allocator, and sampling tensors at hook points misses
what lives between the samples (an op's output and its inputs, a gradient before the reducer
copies it). ``torch.profiler`` with ``profile_memory=True`` records one memory event per
allocation (+bytes, with its address) and per free (-bytes) made while profiling; replaying
them in time order gives the live bytes after every allocation, hence the exact peak::

    prof = CpuMemoryProfile()
    with prof:
        model = build(); opt = ...          # allocated inside: counted from here on
        train_step()                         # warm-up (optimizer state appears)
        with prof.window("step"):
            train_step()                     # the step whose peak we want
    peak, where = prof.peak("step")          # live bytes at the step's highest point

What it cannot see, and how that is handled:

* Allocations made before the profile started: their frees are ignored, so build what should
  be counted inside the profile.
* Frees on a thread the profiler does not follow. A buffer a gloo collective allocates on the
  calling thread (the copy a reduce-scatter works on) is freed when the work object dies, which
  is sometimes on gloo's worker thread: that free is not recorded. ``parallax.zero`` waits for
  each collective in ``Pending.wait``, which returns only once the backend has released the
  work, so while profiling, every collective issued through ``parallax.zero.comm.Comm`` is
  marked, and a block allocated while issuing one whose free was not seen counts as freed when
  its wait returned. Otherwise, when a new block starts at the address of a block still counted
  as live, the old one was freed before (the allocator cannot hand out an address in use) and is
  dropped then. ``unseen_free_bytes`` says how much was corrected either way.
* Allocations on threads that do not carry the profiler's state (OpenMP workers inside a kernel)
  and inside libraries with their own allocators (oneDNN/MKL scratch) are not counted. gloo's
  worker threads carry it while they run a collective, so their staging buffers count.

``prof.phase(name)`` marks sub-ranges (forward, backward, ...) so that ``peak`` can say where the
highest point was.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
from collections.abc import Iterator

from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["CpuMemoryProfile"]

_PREFIX = "parallax.measure."


class CpuMemoryProfile:
    def __init__(self) -> None:
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
        self._live: list[tuple[int, int]] = []  # (time ns, live bytes after the event)
        self._ranges: list[tuple[str, int, int]] = []  # (name, start ns, end ns)
        self._marks = contextlib.ExitStack()
        self.unseen_free_bytes = 0

    def __enter__(self) -> CpuMemoryProfile:
        self._marks.enter_context(_mark_collectives())
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        self._marks.close()
        events, ranges = [], []
        stack = list(self._prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.name == "[memory]":
                f = node.extra_fields
                events.append((node.start_time_ns, f.ptr, int(f.alloc_size)))
            elif node.name.startswith(_PREFIX):
                ranges.append((node.name[len(_PREFIX):], node.start_time_ns, node.end_time_ns))
        self._ranges = [r for r in ranges if not r[0].startswith(("issue#", "wait#"))]
        self._live, self.unseen_free_bytes = _replay(sorted(events, key=lambda e: e[0]), ranges)

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
        """Bytes allocated inside the profile and still alive just before time ``t_ns``."""
        i = bisect.bisect_left(self._live, (t_ns, -(2**62)))
        return self._live[i - 1][1] if i > 0 else 0

    def peak(self, window: str | None = None) -> tuple[int, str | None]:
        """(highest live bytes, the innermost other window it fell in) over ``window`` (default: all).

        Live bytes count everything allocated since the profile started and not yet freed.
        """
        lo, hi = self._range(window) if window is not None else (-1, 2**63)
        peak, when = self.live_at(lo), lo
        for t, total in self._live:
            if lo <= t <= hi and total > peak:
                peak, when = total, t
        inside = [(e - s, n) for n, s, e in self._ranges if s <= when <= e and n != window]
        return peak, (min(inside)[1] if inside else None)


def _replay(events: list[tuple[int, int, int]], ranges: list[tuple[str, int, int]]) -> tuple[list, int]:
    """Live bytes after every event, with the frees the profiler could not see put back."""
    issues = sorted((s, e, name[len("issue#"):]) for name, s, e in ranges if name.startswith("issue#"))
    waits = {name[len("wait#"):]: e for name, s, e in ranges if name.startswith("wait#")}
    starts = [s for s, _, _ in issues]

    def waited(t: int) -> int | None:
        """When the collective being issued at time ``t`` (if any) was waited for."""
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and issues[i][0] <= t <= issues[i][1]:
            return waits.get(issues[i][2])
        return None

    blocks: list[list] = []  # [alloc time, size, free time or None, reused at or None]
    live: dict[int, list] = {}
    for t, ptr, nbytes in events:
        if nbytes > 0:
            stale = live.pop(ptr, None)
            if stale is not None:
                stale[3] = t  # its address is in use again: it was freed unseen before t
            block = [t, nbytes, None, None]
            blocks.append(block)
            live[ptr] = block
        else:
            block = live.pop(ptr, None)  # None: allocated before the profile started
            if block is not None:
                block[2] = t
    changes, unseen = [], 0
    for t, size, freed, reused in blocks:
        changes.append((t, size))
        if freed is None:
            end = waited(t)
            freed = end if end is not None and end > t else reused
            if freed is not None:
                unseen += size
        if freed is not None:
            changes.append((freed, -size))
    changes.sort()
    out, total = [], 0
    for t, delta in changes:
        total += delta
        out.append((t, total))
    return out, unseen


@contextlib.contextmanager
def _mark_collectives() -> Iterator[None]:
    """Name each collective ``parallax.zero`` issues and its wait (``issue#k`` / ``wait#k``)."""
    from parallax.zero import comm

    issue, wait = comm.Comm._issue, comm.Pending.wait
    counter = itertools.count()

    def marked_issue(self, what, fn, *args):
        k = next(counter)
        with record_function(f"{_PREFIX}issue#{k}"):
            pending = issue(self, what, fn, *args)
        pending._measure_id = k
        return pending

    def marked_wait(self):
        k = getattr(self, "_measure_id", None)
        if k is None:
            return wait(self)
        with record_function(f"{_PREFIX}wait#{k}"):
            return wait(self)

    comm.Comm._issue, comm.Pending.wait = marked_issue, marked_wait
    try:
        yield
    finally:
        comm.Comm._issue, comm.Pending.wait = issue, wait
