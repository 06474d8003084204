"""Packed (padding-free) batches: several examples in one row, marked by positions that restart at
0, give the same loss, gradients and logits as the examples run one by one, in every family."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import parallax as px
from parallax.checkpoint.activation import checkpointed_blocks
from parallax.models import from_preset
from parallax.models.attention import PackedSegments
from tests.helpers import CUDA, assert_close

flash_attention = importlib.import_module("parallax.ops.flash_attention")  # the module, not the op it exports

FAMILIES = ["tiny", "llama-tiny", "qwen3-tiny"]
LENGTHS = [5, 9, 3]


def _model(preset: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return from_preset(preset, dropout=0.0, **overrides).float()


def _examples(vocab: int, lengths=LENGTHS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs (L,), targets (L,)) per example, with about a third of the targets masked (-100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        inputs = torch.randint(0, vocab, (n,), generator=g)
        targets = torch.randint(0, vocab, (n,), generator=g)
        targets[torch.rand(n, generator=g) < 0.35] = -100
        targets[-1] = 7  # every example has a trained target
        out.append((inputs, targets))
    return out


def _packed(examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx = torch.cat([i for i, _ in examples])[None]
    targets = torch.cat([t for _, t in examples])[None]
    positions = torch.cat([torch.arange(len(i)) for i, _ in examples])[None]
    return idx, targets, positions


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _unpacked_loss_and_grads(model, examples) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over all trained targets, from each example's own forward (sum of per-example sums)."""
    model.zero_grad()
    total = sum(int((t >= 0).sum()) for _, t in examples)
    loss = sum(model(i[None], t[None]) * int((t >= 0).sum()) for i, t in examples) / total
    loss.backward()
    return loss.detach(), _grads(model)


def _packed_loss_and_grads(model, examples) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    idx, targets, positions = _packed(examples)
    loss = model(idx, targets, positions=positions)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_same(got, expected) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, expected
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, name=name)


@pytest.mark.parametrize("preset", FAMILIES)
def test_packed_loss_and_gradients_equal_examples_one_by_one(preset):
    model = _model(preset)
    examples = _examples(model.config.vocab_size)
    _assert_same(_packed_loss_and_grads(model, examples), _unpacked_loss_and_grads(model, examples))


@pytest.mark.parametrize("preset", FAMILIES)
def test_packed_logits_equal_per_example_logits(preset):
    model = _model(preset).eval()
    examples = _examples(model.config.vocab_size)
    idx, _, positions = _packed(examples)
    with torch.no_grad():
        packed = model(idx, positions=positions)[0]
        alone = torch.cat([model(i[None])[0] for i, _ in examples])
    assert_close(packed, alone, atol=1e-5, rtol=1e-5, name="logits")


@pytest.mark.parametrize("preset", FAMILIES)
def test_attention_never_crosses_an_example_boundary(preset):
    model = _model(preset).eval()
    examples = _examples(model.config.vocab_size)
    idx, _, positions = _packed(examples)
    perturbed = idx.clone()
    first, second = len(examples[0][0]), len(examples[0][0]) + len(examples[1][0])
    perturbed[0, first:second] = (perturbed[0, first:second] + 1) % model.config.vocab_size
    with torch.no_grad():
        before, after = model(idx, positions=positions), model(perturbed, positions=positions)
    others = torch.ones(idx.size(1), dtype=torch.bool)
    others[first:second] = False
    assert_close(after[0, others], before[0, others], atol=0.0, name="logits of the other examples")
    assert not torch.allclose(after[0, first:second], before[0, first:second])


def test_sliding_window_applies_within_each_example():
    model = _model("mistral-tiny", sliding_window=3).eval()
    examples = _examples(model.config.vocab_size)
    idx, _, positions = _packed(examples)
    with torch.no_grad():
        packed = model(idx, positions=positions)[0]
        alone = torch.cat([model(i[None])[0] for i, _ in examples])
    assert_close(packed, alone, atol=1e-5, rtol=1e-5, name="logits")


def test_flash_backend_packs_through_flash_attention_varlen(monkeypatch):
    """attention="flash" routes packed rows through ``flash_attention_varlen`` (its reference
    implementation on CPU), once per layer: the same logits as the per-example SDPA runs."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[3].tolist())  # cu_seqlens_q
        return varlen(*args, **kwargs)

    varlen = flash_attention.flash_attention_varlen
    monkeypatch.setattr(flash_attention, "flash_attention_varlen", counted)
    model = _model("llama-tiny", attention="flash").eval()
    examples = _examples(model.config.vocab_size)
    idx, _, positions = _packed(examples)
    reference = _model("llama-tiny", attention="sdpa").eval()
    with torch.no_grad():
        packed = model(idx, positions=positions)[0]
        alone = torch.cat([reference(i[None])[0] for i, _ in examples])
    assert_close(packed, alone, atol=1e-5, rtol=1e-5, name="logits")
    assert calls == [[0, 5, 14, 17]] * model.config.n_layer


def test_several_packed_rows_each_with_their_own_examples():
    model = _model("llama-tiny").eval()
    rows = [_examples(model.config.vocab_size, [4, 6], seed=2), _examples(model.config.vocab_size, [7, 3], seed=3)]
    packed = [_packed(r) for r in rows]
    idx, positions = torch.cat([p[0] for p in packed]), torch.cat([p[2] for p in packed])
    with torch.no_grad():
        got = model(idx, positions=positions)
        alone = torch.stack([torch.cat([model(i[None])[0] for i, _ in r]) for r in rows])
    assert_close(got, alone, atol=1e-5, rtol=1e-5, name="logits")


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_packed_with_activation_checkpointing_equals_packed_without(preset):
    model = _model(preset)
    examples = _examples(model.config.vocab_size)
    expected = _packed_loss_and_grads(model, examples)
    checkpointed = px.checkpoint.activation(copy.deepcopy(model))
    assert checkpointed_blocks(checkpointed)
    _assert_same(_packed_loss_and_grads(checkpointed, examples), expected)


def test_segments_from_positions():
    segments = PackedSegments.from_positions(torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]]))
    assert segments.cu_seqlens.dtype == torch.int32
    assert segments.cu_seqlens.tolist() == [0, 3, 5, 7, 10]
    assert segments.max_seqlen == 3
    assert segments.segment_ids.tolist() == [[0, 0, 0, 1, 1], [2, 2, 3, 3, 3]]


def test_positions_that_do_not_count_up_within_an_example_are_refused():
    model = _model("tiny")
    with pytest.raises(ValueError, match="restart at 0"):
        model(torch.zeros(1, 4, dtype=torch.long), positions=torch.tensor([[0, 1, 3, 4]]))


def test_a_packed_example_longer_than_block_size_is_refused():
    model = _model("tiny", block_size=8)
    with pytest.raises(ValueError, match="block_size=8"):
        model(torch.zeros(1, 12, dtype=torch.long), positions=torch.arange(12)[None] % 10)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_packed_on_cuda_uses_the_varlen_kernel_and_matches_examples_one_by_one(preset, monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return varlen(*args, **kwargs)

    varlen = flash_attention.flash_attention_varlen
    monkeypatch.setattr(flash_attention, "flash_attention_varlen", counted)
    model = _model(preset).cuda()
    examples = [(i.cuda(), t.cuda()) for i, t in _examples(model.config.vocab_size, [40, 72, 16])]
    got = _packed_loss_and_grads(model, examples)
    assert calls, "the packed forward did not use flash_attention_varlen"
    expected = _unpacked_loss_and_grads(model, examples)
    (loss, grads), (ref_loss, ref_grads) = got, expected
    assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4, name="loss")
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-2, name=name)
