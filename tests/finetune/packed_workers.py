"""Rank-side code of the packed ZeRO test (tests/finetune/test_packed_zero.py): each rank trains on
its own packed batch of SFT examples, against a single process on the same batches."""

from __future__ import annotations

import torch

import parallax as px
from parallax.finetune import SFTExample, collate_packed
from parallax.models import from_preset

SGD = dict(lr=0.5)


def _bins(step: int, world: int) -> list[list[SFTExample]]:
    """One packed bin of examples of varied lengths per rank, with prompt tokens out of the loss."""
    g = torch.Generator().manual_seed(100 + step)
    bins = []
    for _ in range(world):
        lengths = torch.randint(3, 20, (3,), generator=g).tolist()
        bins.append([SFTExample(tuple(torch.randint(0, 257, (n,), generator=g).tolist()),
                                tuple(i >= n // 2 for i in range(n)), "w:0") for n in lengths])
    return bins


def _loss(model: torch.nn.Module, examples: list[SFTExample]) -> torch.Tensor:
    batch = collate_packed(examples)
    return model(batch.input_ids, batch.targets, positions=batch.positions)


def packed_zero_parity(rank: int, world: int, preset: str, stage: int, checkpointing: list[bool]) -> dict[bool, float]:
    """Per activation-checkpointing setting: see ``_parity``."""
    return {c: _parity(rank, world, preset, stage, c) for c in checkpointing}


def _parity(rank: int, world: int, preset: str, stage: int, checkpointing: bool, steps: int = 2) -> float:
    """max |ZeRO - single process| over the state dict after ``steps`` SGD steps of packed batches."""
    torch.manual_seed(0)
    reference = from_preset(preset, dropout=0.0)
    torch.manual_seed(0)
    config = px.RuntimeConfig(zero_stage=stage, activation_checkpointing=checkpointing, bucket_mb=0.01, timeout_s=60)
    model, opt = px.initialize(from_preset(preset, dropout=0.0), config, optimizer_cls=torch.optim.SGD, **SGD)
    ref_opt = torch.optim.SGD(reference.parameters(), **SGD)
    for step in range(steps):
        bins = _bins(step, world)
        opt.backward(_loss(model, bins[rank]))
        opt.step()
        opt.zero_grad()
        # ZeRO averages the ranks' gradients: the single process trains on the mean of their losses.
        (sum(_loss(reference, b) for b in bins) / world).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    full = px.zero.full_state_dict(model)
    return max(float((full[k] - v).abs().max()) for k, v in reference.state_dict().items())
