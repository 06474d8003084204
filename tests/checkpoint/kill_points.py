"""Run code in forked processes that SIGKILL themselves at their N-th file-system change.

Every call that creates, writes, renames, deletes or flushes a file or directory is a kill point:
``os.mkdir/rename/replace/unlink/rmdir/fsync``, ``os.open`` and ``open`` (``pathlib`` goes through
``io.open``) for writing, and safetensors' ``save_file``. Reads are not: killing before a read
leaves the same files as killing before the next change. Killing at each N in turn checks what a
crash at every step leaves on disk.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: once here, not in every child)
import torch.distributed as dist

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _always(*args, **kwargs) -> bool:
    return True


def _os_open_writes(path, flags, *args, **kwargs) -> bool:
    return bool(flags & _WRITE_FLAGS)


def _open_writes(file, mode="r", *args, **kwargs) -> bool:
    return any(c in mode for c in "wax+")


def kill_at_call(n: int) -> Callable[[], None]:
    """From now on, this process kills itself (SIGKILL: no cleanup) just before its ``n``-th
    file-system change; returns the function that stops counting."""
    targets = [(os, name, _always) for name in ("mkdir", "rename", "replace", "unlink", "rmdir", "fsync")]
    targets += [(os, "open", _os_open_writes), (builtins, "open", _open_writes), (io, "open", _open_writes),
                (safetensors.torch, "save_file", _always)]
    originals = [(module, name, getattr(module, name)) for module, name, _ in targets]
    count = 0

    def wrap(fn, changes_files):
        def call(*args, **kwargs):
            nonlocal count
            if changes_files(*args, **kwargs):
                count += 1
                if count == n:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return call

    for module, name, changes_files in targets:
        setattr(module, name, wrap(getattr(module, name), changes_files))

    def disarm() -> None:
        for module, name, fn in originals:
            setattr(module, name, fn)
    return disarm


def _child(rank: int, world_size: int, tmp: str, fn: Callable, args: tuple, kill_at: int | None) -> None:
    """Body of a forked rank: its own gloo group, then ``fn(rank, arm, *args)``; never returns."""
    code = 1
    try:
        torch.set_num_threads(1)  # the parent's thread pool does not survive fork
        store = dist.FileStore(str(Path(tmp) / "store"), world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=30))

        disarm = []

        def arm() -> None:
            if kill_at is not None:
                disarm.append(kill_at_call(kill_at))

        result = fn(rank, arm, *args)
        for stop in disarm:
            stop()
        Path(tmp, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)  # skip the parent's (pytest's) teardown and gloo's at-exit work


def run_forked(fn: Callable, world_size: int, *args, kill_rank: int = 0, kill_at: int | None = None,
               wall_s: float = 60.0) -> dict[int, tuple[int, Any]]:
    """``fn(rank, arm, *args)`` on ``world_size`` forked gloo ranks: {rank: (exit status, return value)}.

    ``fn`` calls ``arm()`` where the kill points start to count; rank ``kill_rank`` is then killed
    at its ``kill_at``-th call (status -SIGKILL, value None). Once it is dead the other ranks,
    which would wait for it in a collective, are killed too.
    """
    with tempfile.TemporaryDirectory() as tmp:
        pids = {}
        for rank in range(world_size):
            pid = os.fork()
            if pid == 0:
                _child(rank, world_size, tmp, fn, args, kill_at if rank == kill_rank else None)
            pids[rank] = pid
        status = {kill_rank: _wait(pids[kill_rank], wall_s)}
        for rank, pid in pids.items():
            if rank != kill_rank:
                if status[kill_rank] != 0:
                    os.kill(pid, signal.SIGKILL)
                status[rank] = _wait(pid, wall_s)
        results = {rank: pickle.loads(Path(tmp, f"rank{rank}.pkl").read_bytes()) if code == 0 else None
                   for rank, code in status.items()}
    return {rank: (status[rank], results[rank]) for rank in range(world_size)}


def _wait(pid: int, wall_s: float) -> int:
    """Exit status of a child (negative: killed by that signal); kills it after ``wall_s``."""
    deadline = time.monotonic() + wall_s
    while True:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(raw)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.002)
