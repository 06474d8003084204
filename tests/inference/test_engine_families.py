"""One forward for training and serving: the engine runs every model family through the model's
own modules, and greedy decoding equals (a) recomputing the full forward without a cache and
(b) Hugging Face ``generate`` on the same random weights, for 32 new tokens.

Tiny fp32 models on CPU; head size 16 so the paged kernels take it; GQA but in GPT-2; the Mistral
model's sliding window (24) is shorter than the context (64), so windows cut during prefill,
chunked prefill and decode.
"""

from __future__ import annotations

import random

import pytest
import torch

from parallax.inference import LLM, EngineConfig, LLMEngine, SamplingParams
from parallax.models import GPT, GPTConfig, Llama, LlamaConfig

CONTEXT = 64
VOCAB = 257
WINDOW = 24

LLAMA_FAMILY = {
    "llama": dict(model_type="llama", rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                  tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", sliding_window=WINDOW),
    "qwen2": dict(model_type="qwen2", rope_theta=1e6, attention_bias=True, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", rope_theta=1e6, qk_norm=True, head_dim=16, n_embd=48,
                  tie_word_embeddings=True),
}
FAMILIES = ["gpt2", *LLAMA_FAMILY]


def build(family: str) -> torch.nn.Module:
    """A tiny model whose greedy choices depend on the context and never hinge on rounding: a fresh
    initialisation barely attends and has nearly flat logits, so the attention and residual
    projections and the final norm's gain are scaled up."""
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT(GPTConfig(block_size=CONTEXT, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64))  # GPT-2 has no GQA
        blocks, final_norm = model.transformer.h, model.transformer.ln_f
        boosts = [("attn.c_attn.weight", 8), ("attn.c_proj.weight", 30), ("mlp.c_proj.weight", 30)]
    else:
        fields = dict(block_size=CONTEXT, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      intermediate_size=96, rms_norm_eps=1e-5)
        model = Llama(LlamaConfig(**{**fields, **LLAMA_FAMILY[family]}))
        blocks, final_norm = model.model.layers, model.model.norm
        boosts = [("self_attn.q_proj.weight", 8), ("self_attn.k_proj.weight", 8), ("self_attn.o_proj.weight", 30),
                  ("mlp.down_proj.weight", 30)]
    with torch.no_grad():
        for block in blocks:
            params = dict(block.named_parameters())
            for name, factor in boosts:
                params[name].mul_(factor)
        final_norm.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request) -> tuple[str, torch.nn.Module]:
    return request.param, build(request.param)


@torch.no_grad()
def recompute_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """Rerun the full forward of the prompt alone for every new token (no KV cache), checking
    that no choice is a near-tie."""
    param = next(model.parameters())
    margin = 1e-4 if param.dtype == torch.float32 else 0.1  # bf16 logits are coarse
    ids = list(prompt)
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids], device=param.device))[0, -1].float()
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) > margin, "near-tie in the reference: the comparison would hinge on rounding"
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def run_all(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, rng: random.Random) -> list:
    """Requests arrive 0-2 per step in a random order while the engine runs; outputs in prompt order."""
    pending = list(range(len(prompts)))
    rng.shuffle(pending)
    index_of, done = {}, {}
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 2)):
            if pending:
                i = pending.pop()
                index_of[engine.add_request(prompts[i], params)] = i
        for out in engine.step():
            if out.finished:
                done[index_of[out.request_id]] = out
    assert engine.stats().used == 0, "finished requests left blocks behind"
    return [done[i] for i in range(len(prompts))]


@pytest.mark.parametrize("attention", ["torch", "paged"])
def test_greedy_equals_full_recompute_for_every_family(family_model, attention):
    """Chunked prefill (12 tokens per step), prefix caching (a shared 20-token prefix), and a pool
    too small for every sequence (preemption, recomputation) on each family; "paged" is the CUDA
    path, run on CPU through the ops' references (or the Triton kernels under TRITON_INTERPRET=1)."""
    family, model = family_model
    rng = random.Random(7)
    shared = [rng.randrange(256) for _ in range(20)]
    prompts = [shared + [rng.randrange(256) for _ in range(n)] for n in (3, 9)]
    prompts += [[rng.randrange(256) for _ in range(n)] for n in (1, 5, 30, 40)]
    engine = LLMEngine(model, config=EngineConfig(block_size=8, num_blocks=10, max_num_seqs=4,
                                                  max_num_batched_tokens=12, attention=attention))
    outs = run_all(engine, prompts, SamplingParams(max_tokens=12, temperature=0), rng)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == recompute_greedy(model, prompt, 12), (family, len(prompt))
    assert engine.num_preemptions > 0, "the pool was meant to force preemption"
    assert engine.stats().hit_tokens > 0, "the shared prefix was meant to hit the cache"


def to_transformers(family: str, model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model with the same weights (Llama-family names are Hugging Face's)."""
    transformers = pytest.importorskip("transformers")  # installed by the test command; the GPU image may lack it
    if family == "gpt2":
        from parallax.models import to_hf

        return _roundtrip_gpt2(model, to_hf)
    cfg = model.config
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                  max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                  tie_word_embeddings=cfg.tie_word_embeddings, head_dim=cfg.head_dim, attn_implementation="eager")
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_scaling=cfg.rope_scaling)),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                           dict(sliding_window=cfg.sliding_window)),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {})}
    config_cls, model_cls, extra = classes[family]
    hf = model_cls(config_cls(**common, **extra))
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def _roundtrip_gpt2(model: torch.nn.Module, to_hf) -> torch.nn.Module:
    import tempfile

    import transformers

    with tempfile.TemporaryDirectory() as d:
        to_hf(model, d)
        return transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()


def test_greedy_equals_transformers_generate(family_model):
    """32 new tokens for prompts of several lengths, batched in one engine, against transformers'
    generate on each prompt alone (its own KV cache, its own masks)."""
    family, model = family_model
    hf = to_transformers(family, model)
    rng = random.Random(11)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 6, 17, 29)]
    llm = LLM(model, block_size=8, max_num_seqs=4)
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0))
    for prompt, out in zip(prompts, outs):
        x = torch.tensor([prompt])
        expected = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, min_new_tokens=32,
                               do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(prompt):]
        assert out.outputs[0].token_ids == expected.tolist(), (family, len(prompt))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_engine_serves_every_family_with_the_paged_kernels(family_model, dtype):
    """On CUDA, 'auto' runs paged_attention (decode) and paged_attention_varlen (prefill, and the
    Mistral model's windowed decode) inside the model's own modules (fused RMSNorm, rotary and
    SwiGLU for the Llama family); greedy tokens equal recomputing the full forward on the same GPU
    (bf16: the first 4 tokens, before rounding differences between the two paths can compound)."""
    family, model = family_model
    model = build(family).to("cuda", dtype)
    rng = random.Random(3)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 7, 30, 45)]
    engine = LLMEngine(model, config=EngineConfig(block_size=16, num_blocks=12, max_num_seqs=4,
                                                  max_num_batched_tokens=24))
    assert engine.runner.attention == "paged"
    tokens = 12 if dtype == torch.float32 else 4
    outs = run_all(engine, prompts, SamplingParams(max_tokens=tokens, temperature=0), rng)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == recompute_greedy(model, prompt, tokens), (family, len(prompt))
