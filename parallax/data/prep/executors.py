"""Where the pipeline's per-shard and per-band work runs: ``LocalExecutor`` (this process, or a pool of
processes) or ``RayExecutor`` (Ray tasks on a local or remote cluster).

Both have ``map(fn, items) -> list`` with results in the order of ``items``, whatever order the
workers finish in, so the output does not depend on the executor or the worker count. ``fn`` and the
items must be picklable (module-level functions, plain dataclasses).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "make_executor"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    workers: int

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]: ...

    def close(self) -> None: ...


def _ignore_sigint() -> None:
    # Ctrl-C goes to the whole process group: the parent handles it (and terminates the pool);
    # a worker dying of KeyboardInterrupt mid-task would instead leave Pool.map waiting forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LocalExecutor:
    """``workers`` = 1: everything runs in this process. More: a process pool per ``map`` call (fork
    start method on Linux, so the workers inherit the imported modules and start in milliseconds;
    spawn elsewhere). Ctrl-C or an exception in a task terminates the workers and is raised here."""

    def __init__(self, workers: int = 1) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1; got {workers!r}")
        self.workers = workers

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        items = list(items)
        processes = min(self.workers, len(items))
        if processes <= 1:
            return [fn(item) for item in items]
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = context.Pool(processes, initializer=_ignore_sigint)
        try:
            # chunksize 1: items are whole shards, few and uneven; results come back in item order.
            results = pool.map(fn, items, chunksize=1)
            pool.close()
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
        return results

    def close(self) -> None:
        """Nothing held between ``map`` calls."""


class RayExecutor:
    """Ray tasks, one per item (1 CPU each). Connects to ``address`` (a running cluster) or, when Ray is
    not initialised yet and no address is given, starts a local instance with ``workers`` CPUs; a Ray
    session it started is shut down by ``close``; one that was already running is left alone.

    Tasks write their results to the output directory, so on a multi-node cluster that directory must
    be on a filesystem every node sees at the same path (NFS, Lustre, a mounted bucket); the workers
    also need parallax importable (installed, or a ``runtime_env`` set up by the cluster).
    """

    def __init__(self, workers: int = 1, address: str | None = None) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1; got {workers!r}")
        self.workers = workers
        self.address = address
        self._started = False
        self._remote: Any = None

    def _ray(self) -> Any:
        try:
            import ray
        except ModuleNotFoundError:
            raise ValueError("executor 'ray' needs Ray: pip install 'ray>=2.9'") from None
        if not ray.is_initialized():
            if self.address is None:
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            self._started = True
        if self._remote is None:
            self._remote = ray.remote(num_cpus=1, max_retries=0)(_call)
        return ray

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        ray = self._ray()
        fn_ref = ray.put(fn)
        refs = [self._remote.remote(fn_ref, item) for item in items]
        try:
            return ray.get(refs)  # in submission order
        except Exception:
            # Wait for the other tasks rather than ray.cancel them: cancelling a task that completes at the
            # same moment aborts the driver process in Ray 2.60 ("Tried to complete task that was not
            # pending", seen in a CI run), and once map returns no task of it is still writing files.
            ray.wait(refs, num_returns=len(refs))
            raise

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
            self._remote = None


def _call(fn: Callable[[T], R], item: T) -> R:
    return fn(item)


def make_executor(kind: str, workers: int, address: str | None = None) -> LocalExecutor | RayExecutor:
    """The executor named ``kind`` ("local" or "ray")."""
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, address)
    raise ValueError(f"executor must be 'local' or 'ray'; got {kind!r}")
