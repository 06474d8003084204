"""Rank-side code of the checkpoint tests."""

from __future__ import annotations

import torch

import parallax as px
from tests.distributed import zero_workers as zw


def _model(stage: int, seed: int = 0, width: int = 7):
    torch.manual_seed(seed)
    model = zw.TinyNet(width=width)
    return px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.0005, timeout_s=60),
                         param_groups=zw._groups(model), lr=1e-2, betas=(0.9, 0.95))


def bad_loads(rank: int, world: int, directory: str) -> dict:
    """Mismatched model, corrupted shard: clear errors, the model and optimizer untouched."""
    out = {}
    model, opt = _model(stage=2, seed=5, width=9)  # width 9 instead of 7
    before = px.zero.full_state_dict(model)
    try:
        px.checkpoint.load(directory, model, opt)
    except px.checkpoint.CheckpointError as exc:
        out["mismatch"] = str(exc)
    after = px.zero.full_state_dict(model)
    out["untouched"] = all(torch.equal(before[k], after[k]) for k in before)
    return out


def load_corrupted(rank: int, world: int, directory: str) -> str:
    model, opt = _model(stage=1, seed=5)
    try:
        px.checkpoint.load(directory, model, opt)
    except px.checkpoint.CheckpointError as exc:
        return str(exc)
    return "no error"


def full_and_consolidated(rank: int, world: int, directory: str, out: str) -> dict:
    model, opt = _model(stage=3)
    zw._train_steps(model, opt, rank, world, 2)
    px.checkpoint.save(directory, model, opt, step=2)
    full = px.zero.full_state_dict(model)
    if rank == 0:
        px.checkpoint.consolidate(directory, out)
    torch.distributed.barrier()
    return full


def save_fails_midway(rank: int, world: int, directory: str) -> str:
    """A save that fails on one rank leaves the previous checkpoint as it was."""
    model, opt = _model(stage=2)
    zw._train_steps(model, opt, rank, world, 1)
    px.checkpoint.save(directory, model, opt, step=1)
    zw._train_steps(model, opt, rank, world, 1, start=1)
    import safetensors.torch as st

    real = st.save_file

    def failing(tensors, path, *a, **k):
        if rank == 1:
            raise OSError("disk full (simulated)")
        return real(tensors, path, *a, **k)

    st.save_file = failing
    try:
        px.checkpoint.save(directory, model, opt, step=2)
    except px.checkpoint.CheckpointError as exc:
        return str(exc)
    finally:
        st.save_file = real
    return "no error"
