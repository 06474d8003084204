"""The CPU ("torch") attention path's two ways to decode: the compiled CPU ``paged_attention``
kernel reading the cache in place, and gather + SDPA (kept for prefix-tuning virtual tokens, a
sliding window that cuts a context, block sizes and head sizes the kernel does not take, and an
extension without the kernel). Both must give exactly the greedy tokens of recomputing the full
forward pass, and each must run where it is meant to (spied on, not assumed).
"""

from __future__ import annotations

import random

import pytest
import torch

from parallax import _extension, ops
from parallax.inference import (
    EngineConfig,
    LLMEngine,
    SamplingParams,
    attention_metadata,
)
from parallax.inference.attention_metadata import (
    PagedAttentionContext,
    SeqInput,
    build_metadata,
)
from parallax.peft.prefix import PrefixTuningConfig, add_prefix_tuning
from tests.helpers import context_sensitive_gpt
from tests.inference.test_engine import (
    random_prompts,
    reference_greedy,
    run_with_arrivals,
)
from tests.inference.test_engine_families import build, recompute_greedy, run_all

pytestmark = pytest.mark.skipif(not _extension.has_kernel("paged_attention", "cpu"),
                                reason=f"parallax._C has no CPU paged_attention kernel ({_extension.build_info()})")


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """Counts the decode calls of each path: the kernel (``ops.paged_attention`` with backend
    'cpu') and the gather (``PagedAttentionContext._decode_gather``)."""
    counts = {"kernel": 0, "gather": 0}
    kernel, gather = ops.paged_attention, PagedAttentionContext._decode_gather

    def spy_kernel(*args, **kwargs):
        counts["kernel"] += kwargs.get("backend") == "cpu"
        return kernel(*args, **kwargs)

    def spy_gather(*args, **kwargs):
        counts["gather"] += 1
        return gather(*args, **kwargs)

    monkeypatch.setattr(ops, "paged_attention", spy_kernel)
    monkeypatch.setattr(PagedAttentionContext, "_decode_gather", spy_gather)
    return counts


@pytest.mark.parametrize("path", ["kernel", "gather"])
def test_both_decode_paths_give_the_recompute_tokens(calls, monkeypatch, path):
    """GQA (4 query heads over 2 KV heads, head size 16), block size 16, chunked prefill,
    preemption and prefix caching; the gather path forced by saying the kernel is absent."""
    if path == "gather":
        monkeypatch.setattr(attention_metadata, "cpu_decode_kernel", lambda device, block_size: False)
    model = context_sensitive_gpt(block_size=64, vocab_size=257, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    rng = random.Random(11)
    prompts = random_prompts(rng, 12, [rng.randrange(256) for _ in range(20)])
    max_tokens = [rng.choice([2, 12, 24]) for _ in prompts]
    engine = LLMEngine(model, config=EngineConfig(block_size=16, num_blocks=64 // 16 + 2, max_num_seqs=6,
                                                  max_num_batched_tokens=16, attention="torch"))
    outs = run_with_arrivals(engine, prompts, [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens], rng)
    for prompt, m, out in zip(prompts, max_tokens, outs):
        assert out.token_ids == reference_greedy(model, prompt, m), (path, len(prompt), m)
    assert engine.num_preemptions > 0, "the pool was meant to force preemption"
    other = "gather" if path == "kernel" else "kernel"
    assert calls[path] > 0 and calls[other] == 0, calls


def test_sliding_window_decodes_use_the_kernel_until_the_window_cuts(calls):
    """Mistral's window (24 tokens): steps whose contexts all fit in it run the kernel, the
    others gather (the kernel has no window); the tokens are the recompute's either way."""
    model = build("mistral")
    rng = random.Random(3)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 5, 12, 30)]
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=24, max_num_seqs=4,
                                                  max_num_batched_tokens=16, attention="torch"))
    outs = run_all(engine, prompts, SamplingParams(max_tokens=16, temperature=0), rng)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == recompute_greedy(model, prompt, 16), len(prompt)
    assert calls["kernel"] > 0 and calls["gather"] > 0, calls


def test_prefix_tuned_model_decodes_by_gathering(calls):
    """The kernel reads only the cache, not the layer's virtual tokens: a prefix-tuned model's
    decodes must all gather (with a block size and head size the kernel takes)."""
    model = add_prefix_tuning(build("llama"), PrefixTuningConfig(num_virtual_tokens=5))
    model.eval()
    rng = random.Random(4)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 7, 19)]
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=16, max_num_seqs=3, max_model_len=48,
                                                  attention="torch"))
    outs = run_all(engine, prompts, SamplingParams(max_tokens=8, temperature=0), rng)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == recompute_greedy(model, prompt, 8), len(prompt)
    assert calls["kernel"] == 0 and calls["gather"] > 0, calls


def test_unsupported_block_size_gathers(calls):
    model = context_sensitive_gpt(block_size=64, vocab_size=257, n_layer=1, n_head=4, n_kv_head=2, n_embd=64)
    engine = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=40, attention="torch"))
    out = run_all(engine, [[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0), random.Random(0))[0]
    assert out.token_ids == reference_greedy(model, [5, 6, 7], 6)
    assert calls["kernel"] == 0 and calls["gather"] > 0, calls


def test_torch_metadata_holds_the_decode_tables():
    """Decodes sorted by context length first: their int32 block tables (padded with block 0) and
    context lengths (the new token included) for the kernel, and the same data as the gather
    path's groups; prefills follow."""
    seqs = [SeqInput([5], start=20, block_table=[3, 1], sample=True),
            SeqInput([1, 2, 3], start=0, block_table=[0], sample=True),
            SeqInput([7], start=3, block_table=[2], sample=False)]
    m = build_metadata(seqs, 16, "torch", torch.device("cpu"))
    assert m.num_decode == 2 and m.order == [2, 0, 1]
    assert m.block_tables.dtype == torch.int32 and m.block_tables.tolist() == [[2, 0], [3, 1]]
    assert m.context_lens.dtype == torch.int32 and m.context_lens.tolist() == [4, 21]
    (lo, hi, blocks, lens), = m.decode_groups
    assert (lo, hi, blocks.tolist(), lens.tolist()) == (0, 2, [2, 0, 3, 1], [4, 21])
    assert m.positions.tolist() == [3, 20, 0, 1, 2] and m.slot_mapping.tolist() == [2 * 16 + 3, 16 + 4, 0, 1, 2]
    unsupported = build_metadata([SeqInput([5], start=2, block_table=[1], sample=True)], 4, "torch",
                                 torch.device("cpu"))
    assert unsupported.block_tables is None and unsupported.context_lens is None


def test_bf16_model_decodes_through_the_kernel_like_the_gather_path(calls, monkeypatch):
    """A bf16 model (what a Hugging Face checkpoint loads as) decodes through the kernel with the
    gather + SDPA path's greedy tokens, and its logprobs are off the exact ones (a float32 forward of
    the same bf16 weights over the whole sequence) by at most twice the gather path's error
    (DESIGN.md's attention rule)."""
    model = context_sensitive_gpt(block_size=64, vocab_size=257, n_layer=2, n_head=4, n_kv_head=2,
                                  n_embd=64).to(torch.bfloat16)
    rng = random.Random(5)
    prompts = random_prompts(rng, 6, [rng.randrange(256) for _ in range(12)])
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=0)

    def generate():
        engine = LLMEngine(model, config=EngineConfig(block_size=16, num_blocks=32, attention="torch"))
        return run_all(engine, prompts, params, random.Random(0))  # the same arrivals each time

    kernel_outs = generate()
    assert calls["kernel"] > 0 and calls["gather"] == 0, calls
    monkeypatch.setattr(attention_metadata, "cpu_decode_kernel", lambda device, block_size: False)
    gather_outs = generate()
    assert calls["gather"] > 0, calls
    exact = model.float()
    errors = {"kernel": 0.0, "gather": 0.0}
    for prompt, k, g in zip(prompts, kernel_outs, gather_outs):
        assert k.token_ids == g.token_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(exact(torch.tensor([prompt + k.token_ids[:-1]]))[0], dim=-1)
        for step, token in enumerate(k.token_ids):
            want = float(logprobs[len(prompt) - 1 + step, token])
            for name, out in (("kernel", k), ("gather", g)):
                errors[name] = max(errors[name], abs(out.outputs[0].logprobs[step].logprob - want))
    assert errors["kernel"] <= 2 * errors["gather"] + 1e-3, errors
