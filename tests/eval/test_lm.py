"""ParallaxLM scores requests as lm-evaluation-harness's `hf` backend does: the same model
directory and tokenizer give the same log-likelihoods (exactly, in fp32), the same rolling
perplexity windows and the same greedy generations."""

from __future__ import annotations

from pathlib import Path

import pytest

from parallax.data import load_tokenizer
from parallax.eval.lm import ParallaxLM, rolling_windows
from parallax.models import from_hf
from tests.eval.tiny_llama import write_tiny_llama

transformers = pytest.importorskip("transformers")  # installed by the test command
lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")  # installed by the test command
from lm_eval.api.instance import Instance  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a Llama 3 style tokenizer (BOS added by its post-processor)."""
    return write_tiny_llama(tmp_path_factory.mktemp("lm") / "llama")


@pytest.fixture(scope="module")
def both(model_dir):
    reference = lm_eval_hf.HFLM(pretrained=str(model_dir), batch_size=3, device="cpu", dtype="float32")
    return reference, ParallaxLM(from_hf(model_dir), load_tokenizer(model_dir), batch_size=3)


def _instances(kind: str, args: list[tuple]) -> list:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_equals_lm_eval_hf(both):
    """Shared contexts with one- and multi-token choices, an empty context (the prefix token), a
    context ending in a space (moved to the continuation), a context longer than the model."""
    reference, ours = both
    requests = [("The capital of France is", " Paris"), ("The capital of France is", " Rome"),
                ("The capital of France is", " P"), ("", "Hello world"), ("Question: what? Answer: ", "yes it is"),
                ("a b", " c"), ("word " * 80, "end"), ("The capital of France is", " Paris")]
    expected = reference.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True)
    got = ours.loglikelihood(requests)
    for (e_lp, e_greedy), (g_lp, g_greedy), request in zip(expected, got, requests):
        assert g_lp == pytest.approx(e_lp, rel=1e-6, abs=1e-5), request
        assert g_greedy == e_greedy, request


def test_rolling_loglikelihood_equals_lm_eval_hf(both):
    reference, ours = both
    texts = ["The quick brown fox jumps over the lazy dog. " * 12, "short", "x"]
    expected = reference.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]),
                                               disable_tqdm=True)
    assert ours.loglikelihood_rolling(texts) == pytest.approx(expected, rel=1e-6)


def test_generate_until_equals_lm_eval_hf(both):
    reference, ours = both
    requests = [("The capital of France is", {"until": ["\n", "."], "max_gen_toks": 10}),
                ("Once upon a time", {"until": ["time"], "max_gen_toks": 12})]
    expected = reference.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    assert ours.generate_until(requests) == expected


def test_rolling_windows_predict_every_token_once_with_the_longest_context():
    tokens = list(range(10))
    windows = rolling_windows(tokens, prefix_token=-1, max_length=4)
    assert [cont for _, cont in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows[0][0] == [-1]  # the prefix token predicts the first token
    for context, cont in windows[1:]:
        assert len(context) + len(cont) - 1 == 4  # the full context length every time
    assert rolling_windows([], 0, 4) == []


def test_bad_requests_fail_clearly(both):
    _, ours = both
    with pytest.raises(ValueError, match="batch_size"):
        ParallaxLM(ours.model, ours.tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="greedy"):
        ours.generate_until([("x", {"until": ["\n"], "do_sample": True})])
