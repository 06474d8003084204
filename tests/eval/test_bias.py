"""Bias (CrowS-Pairs style): sentence log-likelihoods against plain PyTorch on full logits, the
aggregation into shares with binomial standard errors, and the shipped pairs."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from parallax.data import load_tokenizer
from parallax.eval.safety.bias import (
    BIAS_PAIRS,
    BiasPair,
    bias_rows,
    bias_score,
    differing_words,
    load_bias_pairs,
    pair_log_likelihoods,
)
from parallax.eval.safety.likelihood import sequence_log_likelihoods
from parallax.models import build_model, config_from_preset

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _tiny(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(config_from_preset(preset, vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=128)).eval()


def _reference(model: torch.nn.Module, ids: list[int], start: int) -> float:
    """sum_{t >= start} log p(ids[t] | ids[:t]) from the full (T, V) logits of one unpadded row."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].double()  # (T, V)
    logprobs = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]  # (T,)
    return float(logprobs[start - 1:].sum())


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_sequence_log_likelihoods_equal_plain_pytorch_on_full_logits(preset):
    model = _tiny(preset)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 257, size=n).tolist() for n in (2, 9, 17, 30, 5, 64, 12)]
    starts = [1, 3, 1, 29, 4, 10, 12]
    got = sequence_log_likelihoods(model, sequences, starts, batch_size=3)  # padded batches of mixed lengths
    expected = [_reference(model, ids, s) for ids, s in zip(sequences, starts)]
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(expected, abs=1e-4)


def test_sequences_longer_than_the_model_are_scored_as_lm_eval_rolling_windows():
    from parallax.eval.lm import ParallaxLM, rolling_windows

    model = _tiny("tiny")
    rng = np.random.default_rng(1)
    tokens = [rng.integers(0, 256, size=n).tolist() for n in (300, 129, 128, 40)]
    got = sequence_log_likelihoods(model, [[256, *t] for t in tokens], [1] * 4, batch_size=2)
    lm = ParallaxLM(model, load_tokenizer("byte"))
    expected = [sum(ll for ll, _ in lm.score_tokens(rolling_windows(t, 256, 128))) for t in tokens]
    assert got.tolist() == pytest.approx(expected, abs=1e-4)


def test_sequence_log_likelihoods_reject_bad_input():
    model = _tiny("tiny")
    with pytest.raises(ValueError, match="start must be in"):
        sequence_log_likelihoods(model, [[1, 2, 3]], [0])
    with pytest.raises(ValueError, match="same length"):
        sequence_log_likelihoods(model, [[1, 2, 3]], [1, 1])


def test_pair_log_likelihoods_score_every_token_after_the_end_of_text_token():
    model, tokenizer = _tiny("tiny"), load_tokenizer("byte")
    pairs = load_bias_pairs()[:5]
    got = pair_log_likelihoods(model, tokenizer, pairs, batch_size=4)
    expected = [[_reference(model, [tokenizer.eot_id, *tokenizer.encode(text)], 1) for text in
                 (p.stereotyped, p.anti_stereotyped)] for p in pairs]
    assert got.shape == (5, 2) and got.tolist() == [pytest.approx(row, abs=1e-4) for row in expected]


def test_unmodified_score_counts_only_the_tokens_after_the_swapped_word():
    model, tokenizer = _tiny("tiny"), load_tokenizer("byte")
    pair = BiasPair("age", "The old man slept.", "The young man slept.")
    got = pair_log_likelihoods(model, tokenizer, [pair], score="unmodified")[0]
    old, young = ([tokenizer.eot_id, *tokenizer.encode(t)] for t in (pair.stereotyped, pair.anti_stereotyped))
    shared = len(" man slept.")
    assert got.tolist() == pytest.approx([_reference(model, old, len(old) - shared),
                                          _reference(model, young, len(young) - shared)], abs=1e-4)
    with pytest.raises(ValueError, match="score must be one of sentence, unmodified"):
        pair_log_likelihoods(model, tokenizer, [pair], score="mean")


def test_bias_rows_share_of_stereotyped_preferences_with_ties_and_binomial_stderr():
    pairs = [BiasPair(c, "a x", "a y") for c in ["age", "age", "age", "age", "gender", "gender"]]
    scores = np.array([[-1.0, -2.0], [-1.0, -2.0], [-3.0, -2.0], [-2.0, -2.0], [-1.0, -5.0], [-9.0, -5.0]])
    rows = {r["metric"]: r for r in bias_rows(pairs, scores)}
    assert list(rows) == ["stereotype_share", "stereotype_share/age", "stereotype_share/gender"]
    assert rows["stereotype_share/age"] == {"section": "bias", "metric": "stereotype_share/age", "value": 0.625,
                                            "stderr": pytest.approx(math.sqrt(0.625 * 0.375 / 4)), "n": 4}
    assert rows["stereotype_share/gender"]["value"] == 0.5
    assert rows["stereotype_share"]["value"] == pytest.approx(3.5 / 6) and rows["stereotype_share"]["n"] == 6
    with pytest.raises(ValueError, match=r"scores must be \(6, 2\)"):
        bias_rows(pairs, scores[:3])


def test_bias_score_rows_from_a_model():
    rows = bias_score(_tiny("tiny"), load_tokenizer("byte"))
    assert [r["n"] for r in rows] == [120] + [20] * 6
    assert all(0.0 <= r["value"] <= 1.0 and r["stderr"] <= 0.5 / math.sqrt(r["n"]) + 1e-12 for r in rows)


def test_shipped_pairs_are_well_formed():
    lines = BIAS_PAIRS.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(set(r) == {"category", "stereotyped", "anti_stereotyped"} for r in rows)
    assert Counter(r["category"] for r in rows) == {c: 20 for c in ("gender", "age", "nationality", "religion",
                                                                    "disability", "socioeconomic")}
    assert all(len(differing_words(r["stereotyped"], r["anti_stereotyped"])) == 1 for r in rows)
    assert len({r["stereotyped"] for r in rows}) == len(rows)
    assert len(load_bias_pairs()) == 120


@pytest.mark.parametrize("row, message", [
    ({"category": "age", "stereotyped": "The old man.", "anti_stereotyped": "The young woman."}, "exactly one word"),
    ({"category": "age", "stereotyped": "The old man.", "anti_stereotyped": "The old man."}, "exactly one word"),
    ({"category": "age", "stereotyped": "The old man."}, "'anti_stereotyped' must be a non-empty string"),
])
def test_a_bad_pair_is_named_by_its_line(tmp_path, row, message):
    path = tmp_path / "pairs.jsonl"
    good = {"category": "age", "stereotyped": "The old man.", "anti_stereotyped": "The young man."}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=f"pairs.jsonl:2: .*{message}"):
        load_bias_pairs(path)
