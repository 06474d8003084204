"""Spawn local gloo ranks for a benchmark and collect what each returns."""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

__all__ = ["spawn_gloo"]

RankMain = Callable[[int, int, dict], dict]


def _entry(rank: int, world: int, port: int, out_dir: str, rank_main: RankMain, args: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(args["rank_threads"]))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args["rank_threads"])
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=args["timeout"]))
        result = ("ok", rank_main(rank, world, args))
    except BaseException as exc:  # reported by the parent
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    # Skip interpreter finalization: a gloo worker thread that drops its last finished work
    # (and the tensors it holds) after Python started finalizing takes the GIL from a dying
    # interpreter and aborts the process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_gloo(rank_main: RankMain, world: int, args: dict, deadline_s: float) -> list[dict]:
    """Run ``rank_main(rank, world, args)`` on ``world`` spawned processes in one gloo group.

    ``rank_main`` must be a module-level function (it is pickled); ``args`` needs
    ``rank_threads`` (torch threads per rank) and ``timeout`` (collective timeout, seconds).
    Returns each rank's result in rank order; raises RuntimeError with every failing rank's
    traceback, TimeoutError past ``deadline_s``.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        procs = mp.start_processes(_entry, args=(world, _free_port(), out_dir, rank_main, args), nprocs=world,
                                   join=False, start_method="spawn")
        end = time.monotonic() + deadline_s
        try:
            while not procs.join(timeout=max(1.0, min(5.0, end - time.monotonic()))):
                if time.monotonic() > end:
                    raise TimeoutError(f"the {world} ranks did not finish within {deadline_s:.0f} s")
        finally:
            for p in procs.processes:
                if p.is_alive():
                    p.terminate()
        results = []
        for r in range(world):
            path = Path(out_dir, f"rank{r}.pkl")
            results.append(pickle.loads(path.read_bytes()) if path.exists() else ("error", f"rank {r}: no result"))
    errors = [value for status, value in results if status == "error"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [value for _, value in results]
