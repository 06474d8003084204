"""Collectives with a deadline and an error that says what happened.

Every collective is issued asynchronously and waited on with the configured timeout, so a
rank that dies makes the others fail with ``CollectiveError`` (naming the collective and the
timeout) instead of hanging forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["CollectiveError", "Comm", "Pending"]

log = logging.getLogger(__name__)

# torch >= 2.13 renamed the tensor-in, tensor-out collectives; 2.11 has only the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@contextlib.contextmanager
def _without_backward_context() -> Iterator[None]:
    """Issue a collective without the Python object autograd stashes in thread-local state.

    During backward, torch keeps a ``contextvars`` context in thread-local state, and every
    collective issued from a backward hook captures it. The gloo worker thread that finally
    destroys the work then needs the GIL to drop it, and if that happens while the interpreter
    exits the process aborts ("terminate called without an active exception"; 3 runs in 10
    here). Hiding the object while issuing keeps the work free of Python references.
    """
    tls_get = getattr(torch._C, "_get_obj_in_tls", None)
    tls_remove = getattr(torch._C, "_remove_obj_from_tls", None)
    if tls_get is None or tls_remove is None or not torch._C._is_key_in_tls("context"):
        yield
        return
    saved = tls_get("context")
    tls_remove("context")
    try:
        yield
    finally:
        torch._C._stash_obj_in_tls("context", saved)


class CollectiveError(RuntimeError):
    """A collective failed or did not finish in time (often: another rank died)."""


@dataclass
class Pending:
    """An issued collective; ``wait()`` blocks until it is done (or raises CollectiveError)."""

    what: str
    work: object | None
    comm: "Comm"
    tensors: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (tensor, use count before)
    then: list = field(default_factory=list)

    def wait(self) -> None:
        if self.work is not None:
            try:
                ok = self.work.wait(timeout=self.comm.timeout)
            except RuntimeError as exc:
                raise self.comm.error(self.what, exc) from exc
            if ok is False:
                raise self.comm.error(self.what, "timed out")
            self.work = None
            _until_released(self.tensors)
        self.tensors = []
        for fn in self.then:
            fn()
        self.then.clear()


def _until_released(tensors: list[tuple[torch.Tensor, int]], limit_s: float = 1.0) -> None:
    """Wait (microseconds, typically) until the backend's worker thread has dropped its last
    reference to the collective's tensors.

    Otherwise that thread may be the one to free a tensor whose Python object it then has to
    release under the GIL; at interpreter exit that aborts the process ("terminate called
    without an active exception" in 2-3 runs of 10 on the 2-core dev box).
    """
    deadline = None
    for t, before in tensors:
        while t._use_count() > before:
            deadline = deadline or time.monotonic() + limit_s
            if time.monotonic() > deadline:
                log.debug("zero: a collective's tensor is still referenced by the backend")
                return
            os.sched_yield()


class Comm:
    """The collectives ZeRO needs, on one process group, each with ``timeout_s``."""

    def __init__(self, group: dist.ProcessGroup | None, timeout_s: float) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # Where this backend's scratch tensors live (NCCL only takes CUDA tensors).
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.timeout = timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self._native_reduce_scatter = True

    def error(self, what: str, cause: object) -> CollectiveError:
        return CollectiveError(
            f"rank {self.rank}: {what} failed or did not finish within the {self.timeout_s:g} s collective "
            f"timeout (RuntimeConfig.timeout_s); another rank has probably died or diverged ({cause})"
        )

    def _issue(self, what: str, fn, *args) -> Pending:
        tensors = [(t, t._use_count()) for t in args if isinstance(t, torch.Tensor)]
        try:
            with _without_backward_context():
                work = fn(*args, group=self.group, async_op=True)
        except RuntimeError as exc:
            raise self.error(what, exc) from exc
        return Pending(what, work, self, tensors)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, what: str = "broadcast") -> Pending:
        """``tensor`` on every rank becomes rank ``src``'s (``src`` is a rank of this group)."""
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        return self._issue(what, lambda t, group, async_op: dist.broadcast(t, global_src, group=group,
                                                                           async_op=async_op), tensor)

    def all_reduce(self, tensor: torch.Tensor, what: str = "all_reduce",
                   op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Pending:
        return self._issue(what, lambda t, group, async_op: dist.all_reduce(t, op=op, group=group,
                                                                            async_op=async_op), tensor)

    def barrier(self, what: str = "barrier") -> None:
        """Every rank reaches this point (an all-reduce of one element, waited and drained)."""
        self.all_reduce(torch.zeros(1, device=self.device), what).wait()

    def all_gather(self, out: torch.Tensor, shard: torch.Tensor, what: str = "all_gather") -> Pending:
        """``out`` (world_size * shard.numel()) receives every rank's ``shard`` in rank order."""
        return self._issue(what, _all_gather, out, shard)

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor, what: str = "reduce_scatter") -> Pending:
        """``out`` receives this rank's slice of the sum of every rank's ``full``."""
        if self._native_reduce_scatter:
            try:
                return self._issue(what, _reduce_scatter, out, full)
            except CollectiveError as exc:
                if "not supported" not in str(exc).lower() and "unimplemented" not in str(exc).lower():
                    raise
                log.warning("zero: this backend has no reduce_scatter_tensor; using all_reduce + slice")
                self._native_reduce_scatter = False
        pending = self.all_reduce(full, what)
        lo = self.rank * out.numel()
        pending.then.append(lambda: out.copy_(full[lo: lo + out.numel()]))
        return pending

