"""Collectives with a deadline and an error that says what happened.

Every collective is issued asynchronously and waited on with the configured timeout, so a
rank that dies makes the others fail with ``CollectiveError`` (naming the collective and the
timeout) instead of hanging forever.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["CollectiveError", "Comm", "Pending"]

log = logging.getLogger(__name__)

# torch >= 2.13 renamed the tensor-in, tensor-out collectives; 2.11 has only the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CollectiveError(RuntimeError):
    """A collective failed or did not finish in time (often: another rank died)."""


@dataclass
class Pending:
    """An issued collective; ``wait()`` blocks until it is done (or raises CollectiveError)."""

    what: str
    work: object | None
    comm: "Comm"
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
        for fn in self.then:
            fn()
        self.then.clear()


class Comm:
    """The collectives ZeRO needs, on one process group, each with ``timeout_s``."""

    def __init__(self, group: dist.ProcessGroup | None, timeout_s: float) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout = timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self._native_reduce_scatter = True

    def error(self, what: str, cause: object) -> CollectiveError:
        return CollectiveError(
            f"rank {self.rank}: {what} failed or did not finish within the {self.timeout_s:g} s collective "
            f"timeout (RuntimeConfig.timeout_s); another rank has probably died or diverged ({cause})"
        )

    def _issue(self, what: str, fn, *args) -> Pending:
        try:
            work = fn(*args, group=self.group, async_op=True)
        except RuntimeError as exc:
            raise self.error(what, exc) from exc
        return Pending(what, work, self)

    def all_reduce(self, tensor: torch.Tensor, what: str = "all_reduce") -> Pending:
        return self._issue(what, dist.all_reduce, tensor)

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
        pending = self._issue(what, dist.all_reduce, full)
        lo = self.rank * out.numel()
        pending.then.append(lambda: out.copy_(full[lo: lo + out.numel()]))
        return pending

    def all_reduce_now(self, tensor: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
        self.all_reduce(tensor, what).wait()
        return tensor
