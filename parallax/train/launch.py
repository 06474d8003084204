"""``--nproc N`` (and ``--nnodes``): run the same command as N local ranks through torchrun
(torch.distributed.run), alone or as one node of a multi-node run."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

__all__ = ["Launch", "under_launcher", "relaunch_with_torchrun", "torchrun_command"]

# Flags the parent consumes: the ranks learn all of this from torchrun's environment, and
# torchrun's own parser would claim them (--nproc abbreviates its --nproc-per-node; it has
# --nnodes, --node-rank, --master-addr and --master-port of its own).
_LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


@dataclass(frozen=True)
class Launch:
    """Where this node's ranks run: ``nproc`` ranks here, node ``node_rank`` of ``nnodes``,
    rendezvous at ``master_addr:master_port`` (node 0 hosts it)."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def under_launcher() -> bool:
    """True inside a process started by torchrun (or anything else that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def torchrun_command(launch: Launch, argv: list[str]) -> list[str]:
    """The torchrun command line that runs ``python -m parallax <argv>`` as this node's ranks.

    One node: ``--standalone`` (a private rendezvous on a free port). Several: torchrun's static
    rendezvous (``--nnodes --node-rank --master-addr --master-port``), so node R's ranks are
    R x nproc ... R x nproc + nproc - 1: the mesh keeps a tensor-parallel group within a node.
    """
    if launch.nnodes == 1:
        where = ["--standalone"]
    else:
        where = [f"--nnodes={launch.nnodes}", f"--node-rank={launch.node_rank}",
                 f"--master-addr={launch.master_addr}", f"--master-port={launch.master_port}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={launch.nproc}",
            "-m", "parallax", *_without_launch_flags(argv)]


def relaunch_with_torchrun(launch: Launch | int, argv: list[str]) -> int:
    """Run ``python -m parallax <argv>`` as this node's ranks; their exit status.

    torchrun gives each rank RANK/WORLD_SIZE/MASTER_ADDR, stops the others when one fails and
    reports which rank failed and why.
    """
    if isinstance(launch, int):
        launch = Launch(nproc=launch)
    env = dict(os.environ)
    # torchrun would otherwise print a warning and set 1; share the cores out explicitly instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc)))
    return subprocess.call(torchrun_command(launch, argv), env=env)


def _without_launch_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _LAUNCH_FLAGS:
            skip = True
        elif not any(arg.startswith(flag + "=") for flag in _LAUNCH_FLAGS):
            out.append(arg)
    return out
