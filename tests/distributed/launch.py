"""Run a function on N real gloo ranks (spawned processes) and collect what each returns."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    result: tuple = ("error", "did not start")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        result = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # reported to the parent, which fails the test with it
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            if result[0] == "ok":
                try:  # let gloo's worker threads finish with the last collectives
                    dist.barrier()
                except RuntimeError:
                    pass  # a peer is gone (the tests that kill a rank)
            dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    # Skip interpreter teardown: torch's gloo worker threads may still free a finished work whose
    # tensors hold Python objects, and doing that during finalization aborts the process (a
    # torch/gloo issue seen with plain dist.all_reduce too; parallax's own collectives drain it).
    os._exit(0)


def run_ranks_tolerating_exits(fn, world_size: int, *args, timeout_s: float = 60.0, wall_s: float = 120.0) -> dict:
    """Like ``run_ranks`` but ranks may die (os._exit): {rank: (status, value)} of those that reported."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, out_dir, fn, args, timeout_s))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(wall_s)
            if p.is_alive():
                p.kill()
                p.join()
        return {r: pickle.loads(Path(out_dir, f"rank{r}.pkl").read_bytes())
                for r in range(world_size) if Path(out_dir, f"rank{r}.pkl").exists()}


def run_ranks(fn, world_size: int, *args, timeout_s: float = 60.0) -> list:
    """``fn(rank, world_size, *args)`` on each of ``world_size`` gloo ranks; their return values.

    ``fn`` must be importable (defined at module level). Any rank's exception fails the caller.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world_size, free_port(), out_dir, fn, args, timeout_s),
                           nprocs=world_size, join=True, start_method="spawn")
        results = [pickle.loads(Path(out_dir, f"rank{r}.pkl").read_bytes()) for r in range(world_size)]
    errors = [value for status, value in results if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [value for _, value in results]
