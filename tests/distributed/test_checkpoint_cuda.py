"""Saving a checkpoint on a CUDA rank (NCCL, world size 1) moves no random generator, CUDA's included."""

from __future__ import annotations

import pytest
import torch

import parallax as px
from parallax.models import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _dropout_losses(directory) -> tuple[list[float], list[bool]]:
    """4 steps of a tiny GPT with dropout; saving after each step when ``directory`` is given."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16, dropout=0.3)).cuda()
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=2), lr=1e-2)
    losses, unchanged = [], []
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, 32, (2, 9), generator=g).cuda()
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if directory is not None:
            before = (torch.get_rng_state(), torch.cuda.get_rng_state())
            px.checkpoint.save(directory, model, opt, step=step + 1)
            after = (torch.get_rng_state(), torch.cuda.get_rng_state())
            unchanged.append(all(torch.equal(a, b) for a, b in zip(before, after)))
    return losses, unchanged


def test_saving_on_a_gpu_leaves_dropout_draws_unchanged(nccl_group, tmp_path):
    saving, unchanged = _dropout_losses(tmp_path / "c")
    plain, _ = _dropout_losses(None)
    assert unchanged == [True] * 4
    assert saving == plain
