"""Sampling: top-k / top-p masks against a plain reference, draws follow the distribution and are
reproducible per seed, SamplingParams rejects bad values naming the field."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parallax.inference.sampling import (
    SamplingParams,
    sample,
    sample_generator,
    top_k_top_p_mask,
)


def _reference_keep(row: list[float], k: int, p: float) -> set[int]:
    """Top-k (ties with the k-th kept), then the most likely tokens of what is left until their
    probability reaches p, the crossing token included. Float64, one row, by hand."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    kth = row[order[min(k, len(row)) - 1]]
    kept = [i for i in order if row[i] >= kth]
    top = max(row[i] for i in kept)
    weights = [math.exp(row[i] - top) for i in kept]
    total = sum(weights)
    out, mass = set(), 0.0
    for i, w in zip(kept, weights):
        if mass >= p and p < 1.0:
            break
        out.add(i)
        mass += w / total
    return out


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), vocab=st.sampled_from([1, 2, 7, 50, 257]), seed=st.integers(0, 2**31),
       data=st.data())
def test_top_k_top_p_mask_matches_the_reference(rows, vocab, seed, data):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 3
    ks = data.draw(st.lists(st.integers(1, vocab + 3), min_size=rows, max_size=rows))
    # stay clear of the exact boundary between two tokens' cumulative mass (float rounding)
    ps = data.draw(st.lists(st.sampled_from([0.05, 0.3, 0.5, 0.77, 0.9, 0.99, 1.0]), min_size=rows, max_size=rows))
    mask = top_k_top_p_mask(logits.float(), torch.tensor(ks), torch.tensor(ps))
    for r in range(rows):
        expected = _reference_keep(logits[r].tolist(), ks[r], ps[r])
        assert set(mask[r].nonzero().flatten().tolist()) == expected, (r, ks[r], ps[r])


def test_top_k_keeps_ties_with_the_kth_logit():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    mask = top_k_top_p_mask(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert mask.tolist() == [[True, False, True, True, False]]


def test_top_p_at_the_exact_boundary_keeps_the_smallest_set_reaching_it():
    """transformers' TopPLogitsWarper case: 0.5 + 0.3 reaches 0.8 exactly, so two tokens, not three."""
    logits = torch.log(torch.tensor([[0.3, 0.1, 0.1, 0.5], [0.15, 0.3, 0.3, 0.25]]))
    mask = top_k_top_p_mask(logits, torch.tensor([4, 4]), torch.tensor([0.8, 0.8]))
    assert mask.tolist() == [[True, False, False, True], [False, True, True, True]]


def test_greedy_rows_take_the_argmax_and_sampled_rows_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]))
    greedy, sampled = SamplingParams(temperature=0), SamplingParams(temperature=1.0)
    gen = sample_generator(7, 0, "cpu")
    counts = torch.zeros(4)
    for _ in range(4000):
        tokens = sample(logits, [greedy, sampled], [None, gen])
        assert tokens[0] == 3
        counts[tokens[1]] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.03), freq


def test_masks_restrict_what_is_drawn():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    top = set(logits[0].topk(3).indices.tolist())
    params = SamplingParams(temperature=2.0, top_k=3)
    gen = sample_generator(0, 0, "cpu")
    drawn = {int(sample(logits, [params], [gen])[0]) for _ in range(300)}
    assert drawn == top
    nucleus = SamplingParams(temperature=1.0, top_p=1e-6)  # only the most likely token reaches it
    assert {int(sample(logits, [nucleus], [gen])[0]) for _ in range(50)} == {int(logits.argmax())}


def test_draws_depend_only_on_the_seed_and_sample_index():
    logits = torch.randn(3, 97, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.0)] * 3

    def draws(order):
        gens = {i: sample_generator(5, i, "cpu") for i in order}
        out = {i: [] for i in order}
        for _ in range(20):
            tokens = sample(logits[order], params, [gens[i] for i in order])
            for i, t in zip(order, tokens.tolist()):
                out[i].append(t)
        return out

    a, b = draws([0, 1, 2]), draws([2, 0, 1])
    assert a == b  # each row's stream is its own, wherever it sits in the batch
    assert a[0] != a[1] or a[1] != a[2]


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_k", 0), ("top_p", 0.0), ("top_p", 1.5), ("n", 0), ("seed", -1), ("stop", [""]),
    ("stop_token_ids", [-3]), ("ignore_eos", "yes"),
])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})
