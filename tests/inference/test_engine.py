"""The engine end to end on a small random GPT in fp32 on CPU.

Greedy decoding must give exactly the tokens of recomputing the full forward pass for each prompt
alone, whatever arrives when, shares blocks, or gets preempted; seeded sampling must be
reproducible per request; prefix sharing and copy-on-write must never leak tokens between
sequences; bad input fails clearly.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from parallax.models import GPT
from tests.helpers import context_sensitive_gpt

from parallax.data import ByteTokenizer
from parallax.inference import LLM, EngineConfig, LLMEngine, SamplingParams
from parallax.inference.model_runner import resolve_attention
from parallax.inference.sampling import sample, sample_generator

CONTEXT = 64
VOCAB = 257  # the byte tokenizer's


@pytest.fixture(scope="module")
def model() -> GPT:
    # head size 16: the paged kernels take it. GQA: 4 query heads over 2 KV heads.
    return context_sensitive_gpt(block_size=CONTEXT, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


_reference_cache: dict[tuple[int, ...], tuple[list[int], float]] = {}


@torch.no_grad()
def reference_greedy(model: GPT, prompt: list[int], max_tokens: int) -> list[int]:
    """Recompute the full forward of the prompt alone for every new token (no KV cache)."""
    key = tuple(prompt)
    if key not in _reference_cache:
        ids, margins = list(prompt), []
        while len(ids) - len(prompt) < 40 and len(ids) <= CONTEXT:
            logits = model(torch.tensor([ids]))[0, -1]
            top2 = logits.topk(2).values
            margins.append(float(top2[0] - top2[1]))
            ids.append(int(logits.argmax()))
        _reference_cache[key] = (ids[len(prompt):], min(margins))
    tokens, margin = _reference_cache[key]
    assert margin > 1e-4, f"near-tie in the reference ({margin}): the comparison would hinge on rounding"
    return tokens[:max_tokens]


def random_prompts(rng: random.Random, count: int, shared_prefix: list[int]) -> list[list[int]]:
    """Lengths 1..CONTEXT (a few at the very limit); a third start with a shared prefix."""
    prompts = []
    for i in range(count):
        length = rng.choice([1, 2, 5, 9, 17, 23, 31, 40, CONTEXT - 3, CONTEXT])
        tokens = [rng.randrange(256) for _ in range(length)]
        if i % 3 == 0:
            tokens = (shared_prefix + tokens)[:max(length, len(shared_prefix) + 1)]
        prompts.append(tokens)
    return prompts


def run_with_arrivals(engine: LLMEngine, prompts: list, params: list[SamplingParams], rng: random.Random) -> list:
    """Requests arrive in a random order, 0-2 per step, while the engine runs; outputs in prompt order."""
    pending = list(range(len(prompts)))
    rng.shuffle(pending)
    index_of, done = {}, {}
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 2)):
            if pending:
                i = pending.pop()
                index_of[engine.add_request(prompts[i], params[i])] = i
        for out in engine.step():
            if out.finished:
                done[index_of[out.request_id]] = out
    assert engine.stats().used == 0, "finished requests left blocks behind"
    return [done[i] for i in range(len(prompts))]


def expected_length(prompt: list[int], max_tokens: int) -> int:
    return min(max_tokens, CONTEXT + 1 - len(prompt))  # a sequence feeds at most CONTEXT tokens


@pytest.mark.parametrize("seed, block_size, caching", [(0, 8, True), (1, 8, True), (2, 16, False), (3, 4, True)])
def test_greedy_equals_full_recompute_under_preemption_and_random_arrivals(model, seed, block_size, caching):
    rng = random.Random(seed)
    shared = [rng.randrange(256) for _ in range(20)]
    prompts = random_prompts(rng, 14, shared)
    max_tokens = [rng.choice([1, 3, 12, 24]) for _ in prompts]
    # The pool holds one full-length sequence plus two blocks; 16 tokens per step: chunked prefill.
    engine = LLMEngine(model, config=EngineConfig(block_size=block_size, num_blocks=CONTEXT // block_size + 2,
                                                  max_num_seqs=6, max_num_batched_tokens=16, attention="torch",
                                                  enable_prefix_caching=caching))
    outs = run_with_arrivals(engine, prompts, [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens], rng)
    for prompt, m, out in zip(prompts, max_tokens, outs):
        assert out.token_ids == reference_greedy(model, prompt, m), (len(prompt), m)
        assert len(out.token_ids) == expected_length(prompt, m) and out.finish_reason == "length"
        assert out.arrival_time <= out.first_token_time <= out.finished_time
    assert engine.num_preemptions > 0, "the pool was meant to force preemption"
    if caching:
        assert engine.stats().hit_tokens > 0, "shared prefixes and recomputation were meant to hit the cache"


def test_paged_kernel_path_equals_full_recompute(model):
    """attention='paged' is what CUDA runs (flash varlen prefill + paged_attention decode); on CPU
    the ops run their references (or the Triton kernels, interpreted, when TRITON_INTERPRET=1)."""
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (3, 11, 30, 1)] + [[7] * 20 + [1, 2]]
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=9, max_num_seqs=4,
                                                  max_num_batched_tokens=24, attention="paged"))
    assert engine.runner.attention == "paged"
    outs = run_with_arrivals(engine, prompts, [SamplingParams(max_tokens=6, temperature=0)] * len(prompts), rng)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference_greedy(model, prompt, 6)
    assert engine.num_preemptions > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_on_cuda_with_the_paged_kernels(model):
    """On CUDA, 'auto' runs the compiled kernels (flash varlen prefill, paged_attention decode)."""
    rng = random.Random(2)
    shared = [rng.randrange(256) for _ in range(20)]
    prompts = random_prompts(rng, 14, shared)
    engine = LLMEngine(copy.deepcopy(model).cuda(), config=EngineConfig(block_size=8, num_blocks=10, max_num_seqs=6,
                                                                        max_num_batched_tokens=16))
    assert engine.runner.attention == "paged"
    outs = run_with_arrivals(engine, prompts, [SamplingParams(max_tokens=24, temperature=0)] * len(prompts), rng)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference_greedy(model, prompt, 24), len(prompt)
    assert engine.num_preemptions > 0


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(model):
    rng = random.Random(3)
    prompt = [rng.randrange(256) for _ in range(13)]
    params = SamplingParams(max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=1234, n=2)
    alone = LLM(model, block_size=8, num_blocks=40).generate(prompt, params)[0]
    others = [[rng.randrange(256) for _ in range(rng.randint(1, 40))] for _ in range(8)]
    crowded_engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=12, max_num_seqs=5,
                                                          max_num_batched_tokens=20))
    crowd = [SamplingParams(max_tokens=12, temperature=1.0, seed=i) for i in range(len(others))]
    outs = run_with_arrivals(crowded_engine, others + [prompt], crowd + [params], rng)
    assert crowded_engine.num_preemptions > 0
    assert [o.token_ids for o in outs[-1].outputs] == [o.token_ids for o in alone.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids  # two samples, two streams
    other_seed = LLM(model, block_size=8, num_blocks=40).generate(prompt, SamplingParams(
        max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=99))[0]
    assert other_seed.token_ids != alone.token_ids
    torch.manual_seed(7)  # no seed: drawn from torch's generator, so reproducible under manual_seed
    a = LLM(model, num_blocks=40).generate(prompt, SamplingParams(max_tokens=8))[0].token_ids
    torch.manual_seed(7)
    assert LLM(model, num_blocks=40).generate(prompt, SamplingParams(max_tokens=8))[0].token_ids == a


def test_prefix_cache_hits_reuse_blocks_and_outputs_stay_identical(model):
    rng = random.Random(4)
    system = [rng.randrange(256) for _ in range(35)]  # 4 full blocks of 8, shared by every prompt
    prompts = [system + [rng.randrange(256) for _ in range(n)] for n in (1, 6, 13)] + [system]
    params = SamplingParams(max_tokens=10, temperature=0)
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=40))
    first = engine.add_request(prompts[0], params)
    while engine.has_unfinished_requests():
        engine.step()
    table_of_first = engine.blocks.lookup(prompts[0])  # its full blocks stayed cached after it finished
    assert len(table_of_first) == 4
    engine.add_request(prompts[1], params)
    engine.step()
    (seq,) = engine.scheduler.running
    assert engine.blocks.block_table(seq.seq_id)[:4] == table_of_first  # the very same blocks
    assert engine.stats().hit_tokens == 32
    del first

    cached = LLM(model, block_size=8, num_blocks=40).generate(prompts + prompts, params)
    uncached = LLM(model, block_size=8, num_blocks=40, enable_prefix_caching=False).generate(prompts + prompts, params)
    assert [o.token_ids for o in cached] == [o.token_ids for o in uncached]
    for prompt, out in zip(prompts + prompts, cached):
        assert out.token_ids == reference_greedy(model, prompt, 10)


def test_parallel_samples_share_the_prompt_and_copy_on_write(model, monkeypatch):
    """n=4 samples fork from one prefill; the prompt's last block is half full, so each sample's
    first write copies it. Every sample must be what its own generator draws from the logits of
    its own tokens alone (recomputed without cache): no sample ever reads a sibling's token."""
    rng = random.Random(6)
    prompt = [rng.randrange(256) for _ in range(13)]  # 1 full + 1 half-full block of 8
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=11, n=4)
    llm = LLM(model, block_size=8, num_blocks=30)
    copies = []
    copy_blocks = llm.engine.runner.copy_blocks
    monkeypatch.setattr(llm.engine.runner, "copy_blocks", lambda c: (copies.extend(c), copy_blocks(c)))
    out = llm.generate(prompt, params)[0]
    assert len(out.outputs) == 4 and len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert len(copies) == 3, copies  # 3 of the 4 sharers copied the half-full block; the last kept it
    with torch.no_grad():
        for o in out.outputs:
            gen, ids = sample_generator(11, o.index, "cpu"), list(prompt)
            for token in o.token_ids:
                logits = model(torch.tensor([ids]))[0, -1:]
                assert token == int(sample(logits, [params], [gen])[0]), o.index
                ids.append(token)


def test_strings_streaming_stop_and_abort(model):
    tok = ByteTokenizer()
    llm = LLM(model, tokenizer=tok, block_size=8, num_blocks=40)
    base = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    full = llm.generate("Hello", base)[0]
    assert full.prompt == "Hello" and full.prompt_token_ids == list(b"Hello")
    assert full.token_ids == reference_greedy(model, list(b"Hello"), 30) and full.text == tok.decode(full.token_ids)

    chunks = list(llm.stream("Hello", base))
    assert [len(c.token_ids) for c in chunks] == list(range(1, 31)) and chunks[-1].finished
    assert not any(c.finished for c in chunks[:-1]) and chunks[-1].token_ids == full.token_ids

    stop_id = full.token_ids[4]
    stopped = llm.generate("Hello", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                   stop_token_ids=[stop_id]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]

    eos_tok = ByteTokenizer()
    eos_tok.eot_id = stop_id  # the tokenizer's end-of-text id ends a sample unless ignore_eos
    eos = LLM(model, tokenizer=eos_tok, num_blocks=40).generate("Hello", SamplingParams(max_tokens=30, temperature=0))
    assert eos[0].finish_reason == "stop" and eos[0].token_ids == stopped.token_ids

    ascii_chars = [c for c in full.text if c.isascii() and c.isprintable()]
    if ascii_chars:  # a random model's bytes are often not UTF-8; cut at a plain character
        stop = ascii_chars[len(ascii_chars) // 2]
        cut = llm.generate("Hello", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=stop))[0]
        assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]

    stream = llm.stream(["Hello", "World"], base)
    next(stream)
    stream.close()  # the consumer walked away: both requests are aborted, their blocks freed
    assert not llm.engine.has_unfinished_requests() and llm.stats().used == 0


def test_a_too_long_prompt_fails_alone(model):
    llm = LLM(model, block_size=8, num_blocks=20)
    prompts = [[1, 2, 3], list(range(CONTEXT + 6)), [4] * CONTEXT]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0))
    assert outs[1].finish_reason == "error" and outs[1].token_ids == []
    assert f"{CONTEXT + 6} tokens" in outs[1].error and f"context of {CONTEXT}" in outs[1].error
    assert outs[0].token_ids == reference_greedy(model, [1, 2, 3], 5)
    assert outs[2].token_ids == reference_greedy(model, [4] * CONTEXT, 5) and len(outs[2].token_ids) == 1
    assert outs[2].finish_reason == "length"


def test_bad_input_raises_naming_the_argument(model):
    llm = LLM(model, block_size=8, num_blocks=20)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        llm.generate([[1, 2], []])
    assert not llm.engine.has_unfinished_requests(), "nothing is queued when a prompt is rejected"
    with pytest.raises(ValueError, match=r"prompts\[0\] holds token id 999"):
        llm.generate([[1, 999]])
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text")
    with pytest.raises(ValueError, match="SamplingParams.stop needs a tokenizer"):
        llm.generate([[1]], SamplingParams(stop="x"))
    with pytest.raises(ValueError, match="SamplingParams.top_p"):
        llm.generate([[1]], SamplingParams(top_p=1.5))
    with pytest.raises(ValueError, match="params has 1 entries for 2 prompts"):
        llm.generate([[1], [2]], [SamplingParams()])
    with pytest.raises(ValueError, match="SamplingParams.n=99"):
        llm.generate([[1]], SamplingParams(n=99))
    with pytest.raises(ValueError, match="block_size"):
        LLM(model, block_size=0)
    with pytest.raises(ValueError, match="attention must be one of"):
        LLM(model, attention="fast")


def test_a_pool_too_small_for_one_sequence_fails_at_construction(model):
    with pytest.raises(ValueError, match=r"num_blocks=7 of 8 tokens holds 56 tokens.*needs 8 blocks"):
        LLM(model, block_size=8, num_blocks=7)
    with pytest.raises(ValueError, match="KV memory budget of 1000 bytes"):
        LLM(model, block_size=8, kv_cache_memory=1000)
    LLM(model, block_size=8, num_blocks=7, max_model_len=56)  # a shorter context fits
    with pytest.raises(ValueError, match="max_model_len=65"):
        LLM(model, max_model_len=CONTEXT + 1)


def test_default_pool_is_sized_from_memory(model):
    engine = LLM(model, block_size=16, max_num_seqs=3).engine
    assert engine.blocks.num_blocks == 3 * CONTEXT // 16  # capped at what 3 full sequences use
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # k and v, 2 layers, 16 slots, 2 KV heads, head size 16, fp32
    assert LLM(model, block_size=16, kv_cache_memory=5 * per_block + 7).engine.blocks.num_blocks == 5


def test_attention_implementation_choice():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_attention("auto", cuda, 64, 16) == "paged"  # flash varlen + paged_attention on CUDA
    assert resolve_attention("auto", cuda, 24, 16) == "torch"  # a head size the paged kernel lacks
    assert resolve_attention("auto", cpu, 64, 16) == "torch"
    with pytest.raises(ValueError, match="attention='paged' needs"):
        resolve_attention("paged", cpu, 64, 12)
