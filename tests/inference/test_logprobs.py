"""Logprobs of the engine against a plain forward pass (teacher forcing) of a small random GPT.

Each generated token's logprob and its top-k alternatives must equal ``log_softmax`` of the full
model's logits at that position, over the prompt and the tokens generated before it, whatever the
sampling (greedy, temperature/top-p, n > 1), the batch, preemption or chunked prefill; requests
that do not ask get none and the same tokens; bad values are refused naming the field.
"""

from __future__ import annotations

import random

import pytest
import torch
from tests.helpers import context_sensitive_gpt
from parallax.models import GPT

import parallax.inference.engine as engine_module
from parallax.inference import LLM, EngineConfig, LLMEngine, SamplingParams, TokenLogprob
from parallax.inference.sampling import MAX_LOGPROBS

CONTEXT = 48
VOCAB = 96
ATOL = 1e-4  # paged attention vs the full forward in fp32: differences ~1e-6


@pytest.fixture(scope="module")
def model() -> GPT:
    return context_sensitive_gpt(block_size=CONTEXT, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)


@torch.no_grad()
def reference_logprobs(model: GPT, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of the full forward over prompt + generated, at the positions that predicted
    each generated token: (len(generated), V) float32."""
    ids = torch.tensor([prompt + generated])
    logits = model(ids)[0, len(prompt) - 1:len(prompt) - 1 + len(generated)]
    return torch.log_softmax(logits.float(), dim=-1)


def check_sample(model: GPT, prompt: list[int], token_ids: list[int], logprobs: list[TokenLogprob] | None,
                 k: int) -> None:
    assert logprobs is not None and len(logprobs) == len(token_ids) > 0
    ref = reference_logprobs(model, prompt, token_ids)
    for pos, (token, lp) in enumerate(zip(token_ids, logprobs)):
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(ref[pos, token]), abs=ATOL), pos
        assert len(lp.top) == k
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        if k:
            top_values, top_ids = ref[pos].topk(k)
            assert [i for i, _ in lp.top] == top_ids.tolist(), pos
            assert values == pytest.approx(top_values.tolist(), abs=ATOL)


def random_prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.choice([1, 3, 9, 20, 33]))] for _ in range(count)]


@pytest.mark.parametrize("k", [0, 5])
def test_greedy_logprobs_equal_teacher_forcing(model, k):
    prompts = random_prompts(0, 6)
    llm = LLM(model, block_size=8, num_blocks=64, attention="torch")
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, logprobs=k))
    for prompt, out in zip(prompts, outs):
        check_sample(model, prompt, out.token_ids, out.outputs[0].logprobs, k)
        ref = reference_logprobs(model, prompt, out.token_ids)
        # greedy: the chosen token is the most likely one
        assert out.token_ids == ref.argmax(dim=-1).tolist()


def test_sampled_logprobs_are_the_raw_distribution_at_the_sampled_token(model):
    """Temperature, top-k and top-p change which token is drawn, not its reported logprob."""
    prompts = random_prompts(1, 4)
    params = SamplingParams(max_tokens=12, temperature=1.7, top_p=0.9, top_k=30, n=3, seed=11, logprobs=3)
    outs = LLM(model, block_size=8, num_blocks=64).generate(prompts, params)
    unlikely = 0
    for prompt, out in zip(prompts, outs):
        assert len(out.outputs) == 3
        for sample_out in out.outputs:
            check_sample(model, prompt, sample_out.token_ids, sample_out.logprobs, 3)
            unlikely += sum(lp.token_id not in [i for i, _ in lp.top] for lp in sample_out.logprobs)
    assert unlikely > 0, "temperature 1.7 was meant to draw tokens outside the top 3"


def test_mixed_batch_with_preemption_and_chunked_prefill(model):
    """Requests with different k, and without logprobs, share batches; a tight pool preempts
    (recomputation must not add or lose logprobs); a small token budget chunks prefills."""
    prompts = random_prompts(2, 8)
    ks = [None, 0, 1, MAX_LOGPROBS, None, 2, 0, 7]
    params = [SamplingParams(max_tokens=14, temperature=0 if i % 2 else 0.8, seed=i, logprobs=k)
              for i, k in enumerate(ks)]
    llm = LLM(model, block_size=4, num_blocks=CONTEXT // 4 + 3, max_num_seqs=6, max_num_batched_tokens=16,
              attention="torch")
    outs = llm.generate(prompts, params)
    assert llm.engine.num_preemptions > 0, "the pool was meant to force preemption"
    alone = LLM(model, block_size=8, num_blocks=64).generate(
        prompts, [SamplingParams(max_tokens=14, temperature=p.temperature, seed=p.seed) for p in params])
    for prompt, k, out, ref in zip(prompts, ks, outs, alone):
        assert out.token_ids == ref.token_ids  # asking for logprobs does not change the tokens
        if k is None:
            assert out.outputs[0].logprobs is None and ref.outputs[0].logprobs is None
        else:
            check_sample(model, prompt, out.token_ids, out.outputs[0].logprobs, k)


def test_streamed_outputs_carry_one_logprob_per_token(model):
    llm = LLM(model, block_size=8, num_blocks=64)
    seen = 0
    for partial in llm.stream(random_prompts(3, 3), SamplingParams(max_tokens=6, temperature=0.5, n=2, logprobs=1)):
        for sample_out in partial.outputs:
            assert len(sample_out.logprobs) == len(sample_out.token_ids)
            seen += 1
    assert seen > 6


def test_no_logprobs_no_cost(model, monkeypatch):
    """Without a request asking, the log-softmax is never computed."""
    def fail(*args, **kwargs):
        raise AssertionError("token_logprobs called without a request asking for logprobs")
    monkeypatch.setattr(engine_module, "token_logprobs", fail)
    outs = LLM(model, block_size=8, num_blocks=64).generate(random_prompts(4, 3),
                                                            SamplingParams(max_tokens=4, temperature=0.7, n=2))
    assert all(o.logprobs is None for out in outs for o in out.outputs)


def test_failed_and_aborted_requests(model):
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=64))
    engine.add_request([1] * (CONTEXT + 1), SamplingParams(logprobs=2), request_id="long")
    [out] = engine.step()
    assert out.error and out.outputs[0].logprobs == []
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=20, temperature=0, logprobs=2, n=2), request_id="a")
    engine.step()
    engine.step()
    aborted = engine.abort("a")
    assert aborted.finished and [o.finish_reason for o in aborted.outputs] == ["abort", "abort"]
    for o in aborted.outputs:
        assert len(o.logprobs) == len(o.token_ids) == 2
    assert engine.stats().used == 0 and engine.abort("a") is None


@pytest.mark.parametrize("bad", [-1, MAX_LOGPROBS + 1, 1.0, True, "3"])
def test_bad_logprobs_rejected(bad):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=bad)


def test_valid_logprobs_bounds():
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(logprobs=MAX_LOGPROBS).logprobs == MAX_LOGPROBS
    assert SamplingParams().logprobs is None
