"""Tensor-parallel layers and the vocabulary-parallel cross-entropy on 2 gloo ranks against
plain PyTorch, element-wise: outputs and gradients."""

from __future__ import annotations

from tests.distributed.launch import run_ranks
from tests.parallel import tensor_workers as tw


def test_layers_match_full_modules():
    """Column (gathered, sharded, fused q/k/v sections), row (split input or not), Hugging Face
    Conv1D layouts and the vocabulary embedding, with and without sequence parallelism: outputs,
    input gradients and this rank's slice of the parameter gradients equal the full module's."""
    run_ranks(tw.layer_checks, 2)


def test_vocab_parallel_cross_entropy_matches_full_logits():
    """Loss and gradients of the vocabulary-parallel cross-entropy and of its fused, chunked
    linear form equal F.cross_entropy on the full logits (mean and per-row, ignored rows)."""
    run_ranks(tw.cross_entropy_checks, 2)
