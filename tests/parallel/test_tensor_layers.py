"""Tensor-parallel layers and the vocabulary-parallel cross-entropy on 2 gloo ranks against
plain PyTorch, element-wise: outputs and gradients."""

from __future__ import annotations

import pytest

from tests.distributed.launch import run_ranks
from tests.parallel import tensor_workers as tw


@pytest.fixture(scope="module")
def failures() -> dict:
    """Each check group's failure message (None: passed), from both ranks, one launch."""
    per_rank = run_ranks(tw.layer_and_loss_checks, 2)
    return {name: [r[name] for r in per_rank if r[name]] for name in per_rank[0]}


def test_layers_match_full_modules(failures):
    """Column (gathered, sharded, fused q/k/v sections), row (split input or not), Hugging Face
    Conv1D layouts and the vocabulary embedding, with and without sequence parallelism: outputs,
    input gradients and this rank's slice of the parameter gradients equal the full module's."""
    assert not failures["layer_checks"], failures["layer_checks"]


def test_vocab_parallel_cross_entropy_matches_full_logits(failures):
    """Loss and gradients of the vocabulary-parallel cross-entropy and of its fused, chunked
    linear form equal F.cross_entropy on the full logits (mean and per-row, ignored rows)."""
    assert not failures["cross_entropy_checks"], failures["cross_entropy_checks"]
