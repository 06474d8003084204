"""Tensor parallelism in one process: clear errors, before any process allocates memory, for sizes it
cannot split; what slicing a module keeps."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parallax.models import GPTConfig, LlamaConfig, build_model
from parallax.parallel import Mesh, ParallelDims
from parallax.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                      check_tensor_parallel, parallelize, vocab_parallel_cross_entropy,
                                      vocab_parallel_linear_cross_entropy)
from parallax.parallel.state import tp_slice
from parallax.parallel.tensor.layers import shard_slice, split_size


def _gpt(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(block_size=8, vocab_size=64, n_layer=1, n_head=4, n_embd=32), **overrides})


def _llama(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**dict(block_size=8, vocab_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=32,
                                 intermediate_size=64), **overrides})


@pytest.mark.parametrize("config, tp, message", [
    (_gpt(n_head=6, n_embd=48), 4, "n_head = 6 is not divisible by tp = 4"),
    (_gpt(n_kv_head=2), 4, "n_kv_head = 2 is not divisible by tp = 4"),
    (_gpt(vocab_size=3), 4, "vocab_size = 3 is too small to split over tp = 4"),
    (_gpt(vocab_size=5), 4, "vocab_size = 5 is too small to split over tp = 4"),  # chunks 2, 2, 1, none
    (_gpt(n_inner=66), 4, "MLP width (n_inner) = 66 is not divisible by tp = 4"),
    (_llama(), 4, "n_kv_head = 2 is not divisible by tp = 4"),
    (_llama(n_kv_head=4, intermediate_size=42), 4, "intermediate_size = 42 is not divisible by tp = 4"),
])
def test_indivisible_sizes_name_the_size_and_tp(config, tp, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_tensor_parallel(config, tp)
    check_tensor_parallel(config, 1)


@pytest.mark.parametrize("config, tp", [(_gpt(vocab_size=257), 2), (_gpt(vocab_size=257), 4),
                                        (_gpt(vocab_size=7), 4), (_llama(vocab_size=97), 2)])
def test_a_vocabulary_tp_does_not_divide_is_accepted(config, tp):
    """Only the vocabulary may split unevenly (the byte tokenizer's 257 ids over tp = 2); 7 ids
    over tp = 4 still give every rank some (2, 2, 2, 1)."""
    check_tensor_parallel(config, tp)


@pytest.mark.parametrize("size, tp", [(257, 2), (257, 3), (97, 4), (7, 4), (64, 4)])
def test_shard_slices_follow_torch_chunk(size, tp):
    """Each rank's slice (tp_slice, shard_slice) is torch.chunk's: ceil(size / tp) rows, the last
    smaller, in rank order covering the dimension once."""
    full = torch.arange(size * 3).view(size, 3)
    slices = [shard_slice(full, 0, rank, tp) for rank in range(tp)]
    for rank, (mine, expected) in enumerate(zip(slices, full.chunk(tp, 0))):
        assert torch.equal(mine, expected)
        start, end = tp_slice(size, tp, rank)
        assert torch.equal(mine, full[start:end])
    assert torch.equal(torch.cat(slices), full)


def test_vocab_parallel_loss_checks_its_slice_against_the_vocabulary():
    """One process (tp = 1) holds the whole vocabulary: logits of 5 ids are not a vocabulary of 7."""
    logits, targets = torch.randn(3, 5), torch.tensor([0, 1, 4])
    with pytest.raises(ValueError, match="holds 5 vocabulary ids; a vocab_size of 7 split like torch.chunk gives it 7"):
        vocab_parallel_cross_entropy(logits, targets, vocab_size=7)
    torch.testing.assert_close(vocab_parallel_cross_entropy(logits, targets, vocab_size=5),
                               F.cross_entropy(logits, targets))


def test_hugging_face_configs_are_checked():
    from transformers import LlamaConfig as HFLlamaConfig

    config = HFLlamaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, num_hidden_layers=1)
    check_tensor_parallel(config, 2)
    with pytest.raises(ValueError, match="num_key_value_heads = 2 is not divisible by tp = 4"):
        check_tensor_parallel(config, 4)


def _mesh(tp: int) -> Mesh:
    """A mesh object for the checks that run before any collective (no process group needed)."""
    return Mesh(ParallelDims(tp=tp), 0, None, None, None)


def test_parallelize_refuses_bad_models_before_touching_them():
    model = build_model(_gpt(n_kv_head=2))
    with pytest.raises(ValueError, match="n_kv_head = 2 is not divisible by tp = 4"):
        parallelize(model, _mesh(4))
    assert isinstance(model.transformer.h[0].attn.c_attn, nn.Linear)
    with pytest.raises(TypeError, match="no plan for Sequential"):
        parallelize(nn.Sequential(nn.Linear(2, 2)), _mesh(2))
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        check_tensor_parallel(_gpt(), 0)


def test_sequence_parallel_is_refused_for_hugging_face_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=8, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="sequence parallelism is available for parallax's GPT and Llama"):
        parallelize(model, _mesh(2), sequence_parallel=True)


def test_layer_widths_must_split_evenly():
    with pytest.raises(ValueError, match="out_features = 7 is not divisible by the tensor-parallel degree tp = 2"):
        split_size(7, 2, "out_features")
    with pytest.raises(ValueError, match=r"sections \[4, 2\] must add up to out_features = 7"):
        ColumnParallelLinear(3, 7, sections=[4, 2])


def test_from_module_keeps_frozen_parameters_frozen():
    """Slicing a module keeps requires_grad (frozen embeddings or layers stay frozen); one process,
    no process group: tp = 1."""
    linear = nn.Linear(4, 6).requires_grad_(False)
    assert not any(p.requires_grad for p in ColumnParallelLinear.from_module(linear, None).parameters())
    assert not any(p.requires_grad for p in RowParallelLinear.from_module(linear, None).parameters())
    embedding = nn.Embedding(6, 4).requires_grad_(False)
    assert not VocabParallelEmbedding.from_module(embedding, None).weight.requires_grad
    assert ColumnParallelLinear.from_module(nn.Linear(4, 6), None).weight.requires_grad


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_fused_loss_in_bf16_is_close_to_fp32(device):
    """The fused vocabulary-parallel loss (one process: the whole vocabulary) with bf16 h and
    weight: loss and gradients within bf16 rounding of F.cross_entropy in fp32."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 24, generator=g)
    weight = torch.randn(50, 24, generator=g) / 5
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[3] = -100
    h32, w32 = (t.to(device).clone().requires_grad_() for t in (h, weight))
    F.cross_entropy(h32 @ w32.t(), targets.to(device)).backward()
    h16, w16 = (t.to(device, torch.bfloat16).requires_grad_() for t in (h, weight))
    loss = vocab_parallel_linear_cross_entropy(h16, w16, targets.to(device), chunk_rows=16)
    loss.backward()
    ref = F.cross_entropy(h32 @ w32.t(), targets.to(device))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h16.grad.float(), h32.grad, rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(w16.grad.float(), w32.grad, rtol=5e-2, atol=2e-3)
