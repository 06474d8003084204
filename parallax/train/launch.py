"""``--nproc N``: run the same command in N local processes through torchrun (torch.distributed.run)."""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["under_launcher", "relaunch_with_torchrun"]


def under_launcher() -> bool:
    """True inside a process started by torchrun (or anything else that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``python -m parallax <argv>`` as ``nproc`` ranks on this machine; their exit status.

    torchrun gives each rank RANK/WORLD_SIZE/MASTER_ADDR, stops the others when one fails and
    reports which rank failed and why.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "parallax", *_without_nproc(argv)]
    env = dict(os.environ)
    # torchrun would otherwise print a warning and set 1; share the cores out explicitly instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def _without_nproc(argv: list[str]) -> list[str]:
    # torchrun's own parser would claim --nproc (an abbreviation of its --nproc-per-node), and
    # the ranks do not need it: WORLD_SIZE tells them they are ranks.
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
