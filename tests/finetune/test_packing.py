"""Packing: best-fit-decreasing bins, packed and padded batches, and a packed completion-only batch
through a model equal to its examples one by one."""

from __future__ import annotations

import random

import pytest
import torch

from parallax.data import load_tokenizer
from parallax.finetune import (IGNORE_INDEX, SFTExample, best_fit_decreasing, collate_packed, collate_padded,
                               pack_examples, packing_padding_share, render_row)
from parallax.models import from_preset
from tests.helpers import assert_close


def _example(n: int, trained_from: int = 1) -> SFTExample:
    """n tokens 0..n-1 (mod 250), trained from index trained_from on."""
    return SFTExample(tuple(i % 250 for i in range(n)), tuple(i >= trained_from for i in range(n)), f"f:{n}")


def test_best_fit_decreasing_bins_respect_capacity_and_keep_every_item():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(500)] + [512]
    bins = best_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    # Near the lower bound ceil(total / capacity): the fill on this varied-length fixture is tight.
    lower_bound = -(-sum(lengths) // 512)
    assert len(bins) <= lower_bound + 1
    examples = [_example(n + 1) for n in lengths]
    assert packing_padding_share(pack_examples(examples, 512), 512) < 0.02


def test_best_fit_picks_the_fullest_bin_that_fits():
    # Decreasing: 6 -> bin0 (4 left), 5 -> bin1 (5 left), 4 -> bin0 (fullest fit: 0 left), 3 -> bin1.
    assert best_fit_decreasing([4, 6, 3, 5], 10) == [[1, 0], [3, 2]]


def test_an_item_longer_than_a_bin_is_refused():
    with pytest.raises(ValueError, match="item 1 has length 11 > capacity 10"):
        best_fit_decreasing([3, 11], 10)


def test_packed_batch_layout():
    a, b = _example(4, trained_from=2), _example(3)
    batch = collate_packed([a, b])
    assert batch.input_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.positions.tolist() == [[0, 1, 2, 0, 1]]
    # a's last input predicts its own last token; nothing predicts b's first token.
    assert batch.targets.tolist() == [[IGNORE_INDEX, 2, 3, 1, 2]]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 3, 5]
    assert batch.max_seqlen == 3 and batch.num_trained == 4


def test_padded_batch_layout_and_padding_share():
    batch = collate_padded([_example(4), _example(2)], pad_id=99)
    assert batch.input_ids.tolist() == [[0, 1, 2], [0, 99, 99]]
    assert batch.targets.tolist() == [[1, 2, 3], [1, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.num_padding == 2 and batch.padding_share == pytest.approx(2 / 6)


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_packing_with_completion_only_masks_equals_examples_one_by_one(preset):
    tok = load_tokenizer("byte")
    rows = [{"prompt": "Reverse: abc\n", "completion": "cba"}, {"prompt": "1+2=", "completion": "3"},
            {"prompt": "Copy: hello\n", "completion": "hello"}]
    examples = [render_row(r, tok, None, f"r:{i}") for i, r in enumerate(rows)]
    torch.manual_seed(0)
    model = from_preset(preset, dropout=0.0).float()
    (bin_,) = pack_examples(examples, max_length=64)
    batch = collate_packed(bin_)
    packed = model(batch.input_ids, batch.targets, positions=batch.positions)
    packed.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = sum(e.num_trained for e in examples)
    one_by_one = sum(model(*(t[None] for t in e.inputs_and_targets())) * e.num_trained for e in examples) / total
    one_by_one.backward()
    assert total == batch.num_trained == sum(len(r["completion"]) + 1 for r in rows)
    assert_close(packed.detach(), one_by_one.detach(), atol=1e-6, rtol=1e-5, name="loss")
    for name, p in model.named_parameters():
        assert_close(packed_grads[name], p.grad, atol=1e-6, rtol=1e-4, name=name)
