"""Training checkpoints: ``OUT/checkpoints/step_NNNNNN/`` written atomically (temp dir, then rename).

Each holds ``model.safetensors`` (weights + GPTConfig, loadable with ``GPT.load``) and
``train_state.pt`` (optimizer state, step, run config). A crash mid-write leaves only a
``.tmp-*`` directory that is never read and is removed by the next save.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from parallax.models import GPT

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "list_checkpoints"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step_(\d{6,})$")


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / "train_state.pt").is_file() and (child / "model.safetensors").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str | Path, model: GPT, optimizer: torch.optim.Optimizer, *, step: int,
                    config: dict[str, Any], keep: int) -> Path:
    """Write step ``step`` under ``root`` atomically and keep only the ``keep`` newest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        model.save(tmp / "model.safetensors")
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": config}, tmp / "train_state.pt")
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint: saved step %d to %s", step, final)
    return final


def load_checkpoint(path: str | Path) -> tuple[GPT, dict[str, Any]]:
    """The model and the train state (``step``, ``optimizer``, ``config``) of one checkpoint."""
    path = Path(path)
    model = GPT.load(path / "model.safetensors")
    state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    return model, state
