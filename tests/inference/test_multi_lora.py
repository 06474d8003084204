"""Many LoRA adapters over one base in the paged engine (``parallax.inference.lora``): a batch
mixing adapters and the base gives every request what its adapter alone gives, what the merged
model gives, and the base what a model without adapters gives; the prefix cache never shares KV
across adapters; a PEFT adapter from the peft library serves as transformers + peft generates.

Tiny fp32 models on CPU (weights scaled so greedy choices never hinge on rounding, as in
``test_engine_families``); adapters of ranks 2, 4 and 8 on different modules, with random
nonzero A and B (``init_lora_weights=False``), so each one changes the outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch

import parallax as px
from parallax.inference import LLM, BlockManager, SamplingParams
from parallax.inference.block_manager import prefix_root
from parallax.inference.lora import LoraRegistry, use_routing
from parallax.models import GPT, GPTConfig, Llama, LlamaConfig, from_hf
from parallax.peft.lora import lora_layers

CONTEXT = 64
VOCAB = 97
GREEDY = SamplingParams(max_tokens=10, temperature=0)
# lengths out of order: the engine batches decodes by context length, not in request order
PROMPTS = [[(7 * i + 3 * j) % VOCAB for j in range(n)] for i, n in enumerate([17, 5, 25, 9, 13, 21])]
# name -> LoraConfig fields, per family: different ranks, targets and scalings
ADAPTERS = {
    "gpt2": {"a": dict(r=2, lora_alpha=4, target_modules=["c_attn"]),
             "b": dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj"]),
             "c.v1": dict(r=8, lora_alpha=32, target_modules=["c_fc"])},
    "llama": {"a": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
              "b": dict(r=4, lora_alpha=4, target_modules="all-linear"),
              "c.v1": dict(r=8, lora_alpha=16, target_modules=["down_proj", "o_proj"], use_rslora=True)},
}


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT(GPTConfig(block_size=CONTEXT, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64))
        blocks, final_norm = model.transformer.h, model.transformer.ln_f
        boosts = [("attn.c_attn.weight", 8), ("attn.c_proj.weight", 30), ("mlp.c_proj.weight", 30)]
    else:
        model = Llama(LlamaConfig(block_size=CONTEXT, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                  intermediate_size=96, rms_norm_eps=1e-5))
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


def save_adapters(base: torch.nn.Module, family: str, root: Path) -> dict[str, Path]:
    """Each adapter of ADAPTERS[family] trained-like (random A and B) on a copy of base, saved in PEFT's format."""
    dirs = {}
    for k, (name, fields) in enumerate(ADAPTERS[family].items()):
        torch.manual_seed(100 + k)
        model = px.peft.get_peft_model(copy.deepcopy(base), px.peft.LoraConfig(init_lora_weights=False, **fields))
        dirs[name] = root / name
        model.save_adapter(dirs[name])
    return dirs


def merged(base: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """A copy of base with only this adapter, merged into its weights."""
    return px.peft.load_adapter(copy.deepcopy(base), adapter).merge_and_unload().eval()


def tokens(outputs) -> list[list[int]]:
    return [o.token_ids for o in outputs]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request, tmp_path_factory):
    base = build(request.param)
    dirs = save_adapters(base, request.param, tmp_path_factory.mktemp(request.param))
    llm = LLM(copy.deepcopy(base), block_size=8, num_blocks=64, max_num_seqs=16)
    for name, path in dirs.items():
        llm.add_lora(name, path)
    return base, dirs, llm


def test_a_mixed_batch_gives_each_request_its_adapters_tokens(family):
    """(1) mixed batch == each adapter served alone (an engine with only it), (2) == the merged
    model, (3) base requests == a model that never had adapters; each adapter changes the output."""
    base, dirs, llm = family
    names = [*dirs, None]
    loras = [names[i % len(names)] for i in range(len(PROMPTS))] + list(names)
    prompts = PROMPTS + [PROMPTS[-1]] * len(names)  # the same prompt through every adapter too
    mixed = llm.generate(prompts, GREEDY, lora=loras)
    assert [o.lora for o in mixed] == loras
    plain = tokens(LLM(copy.deepcopy(base), block_size=8, num_blocks=64).generate(prompts, GREEDY))
    for name in names:
        rows = [i for i, n in enumerate(loras) if n == name]
        got = [mixed[i].token_ids for i in rows]
        mine = [prompts[i] for i in rows]
        if name is None:
            assert got == [plain[i] for i in rows]
            continue
        alone = LLM(copy.deepcopy(base), block_size=8, num_blocks=64)
        alone.add_lora(name, dirs[name])
        assert got == tokens(alone.generate(mine, GREEDY, lora=name)), name
        assert got == tokens(LLM(merged(base, dirs[name]), block_size=8, num_blocks=64).generate(mine, GREEDY)), name
        assert got != [plain[i] for i in rows], f"adapter {name} changes nothing: the test would prove nothing"
    last = {n: mixed[len(PROMPTS) + k].token_ids for k, n in enumerate(names)}
    assert len({tuple(t) for t in last.values()}) == len(names)  # one prompt, four different continuations


def _count_sgmv_calls(monkeypatch) -> list[str]:
    """Every sgmv kernel call of the routing from now on appends the backend that ran it: on CPU
    the in-place C++ op (``sgmv_add_``, "cpu"), elsewhere px.ops.sgmv; the torch fallbacks of
    parallax.inference.lora raise."""
    import parallax.inference.lora as lora_module
    from parallax import ops

    sgmv_module = importlib.import_module("parallax.ops.sgmv")
    calls, real, real_init = [], sgmv_module.sgmv, lora_module.TokenRouting.__init__

    def counting(x, *args, **kw):
        calls.append(kw.get("backend") or ops.backend("sgmv", x.device))
        return real(x, *args, **kw)

    def counting_init(self, *args, **kw):
        real_init(self, *args, **kw)
        if self._cpu_add is not None:
            op = self._cpu_add

            def counted(*op_args):
                calls.append("cpu")
                return op(*op_args)
            self._cpu_add = counted

    def fallback(*args, **kw):
        raise AssertionError("the torch fallback ran although the sgmv kernel is there")

    monkeypatch.setattr(sgmv_module, "sgmv", counting)
    monkeypatch.setattr(lora_module.TokenRouting, "__init__", counting_init)
    monkeypatch.setattr(lora_module.TokenRouting, "_masked", fallback)
    monkeypatch.setattr(lora_module.TokenRouting, "_sorted", fallback)
    return calls


@pytest.mark.parametrize("path", ["kernel", "masked", "segments"])
def test_routed_logits_equal_each_merged_model(family, path, monkeypatch):
    """The batched path itself: rows of one forward routed to different adapters (and the base)
    give the logits of the model with that adapter merged, to float32 rounding; on CPU the
    compiled sgmv kernel, and both torch fallbacks used without it (every slot through one mask,
    and two matmuls per slot on slot-sorted tokens)."""
    import parallax.inference.lora as lora_module

    if path == "kernel":
        calls = _count_sgmv_calls(monkeypatch)
    else:
        monkeypatch.setattr(lora_module, "_cpu_sgmv_kernel", lambda: False)
        monkeypatch.setattr(lora_module, "_masked_is_cheaper", lambda *shape: path == "masked")
    base, dirs, llm = family
    registry: LoraRegistry = llm.engine.loras
    idx = torch.tensor([p[:5] for p in PROMPTS[:4]])  # (4, 5)
    slots = [0, 1, 2, -1]
    references = [merged(base, dirs[name]) for name in registry.names] + [base]
    model = llm.engine.model
    with torch.no_grad():
        with use_routing(registry.routing(torch.tensor(slots).repeat_interleave(5), idx.device)):
            got = model.logits(model.hidden_states(idx))  # (4, 5, V)
        for row, ref in zip(range(4), references):
            want = ref.logits(ref.hidden_states(idx[row:row + 1]))[0]
            torch.testing.assert_close(got[row], want, atol=2e-4, rtol=1e-4)
        for _, layer in lora_layers(model):  # the layers' adapter weights are views into the stacks: stored once
            stacks = registry.stacks(layer)
            assert {w.untyped_storage().data_ptr() for w in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]} \
                == {stacks.lora_a.untyped_storage().data_ptr(), stacks.lora_b.untyped_storage().data_ptr()}
        # outside a routing the model is the base (the engine's adapters are inactive)
        torch.testing.assert_close(model.logits(model.hidden_states(idx)), base.logits(base.hidden_states(idx)))
    if path == "kernel":  # one call per adapted layer, all on the C++ kernel
        assert calls and set(calls) == {"cpu"}, calls


def test_the_cpu_engine_routes_through_the_sgmv_kernel(family, monkeypatch):
    """A mixed batch on CPU runs every LoraLinear through the C++ sgmv kernel, in place (the torch
    fallbacks never run), with the same greedy tokens as the engine without that kernel."""
    import parallax.inference.lora as lora_module

    base, dirs, llm = family
    names = [*dirs, None]
    loras = [names[i % len(names)] for i in range(len(PROMPTS))]
    with monkeypatch.context() as patch:
        patch.setattr(lora_module, "_cpu_sgmv_kernel", lambda: False)
        fallback = tokens(llm.generate(PROMPTS, GREEDY, lora=loras))
    calls = _count_sgmv_calls(monkeypatch)
    assert tokens(llm.generate(PROMPTS, GREEDY, lora=loras)) == fallback
    assert len(calls) >= GREEDY.max_tokens and set(calls) == {"cpu"}, calls


def test_prefix_cache_keeps_adapters_apart(family):
    """The same 40-token prompt through two adapters: no shared blocks (both outputs right); the
    same adapter again hits the cache; n = 2 forks and preempted, recomputed sequences keep their adapter."""
    base, dirs, _ = family
    llm = LLM(copy.deepcopy(base), block_size=8, num_blocks=64)
    for name, path in dirs.items():
        llm.add_lora(name, path)
    prompt = [(5 * j + 1) % VOCAB for j in range(40)]
    want = {name: tokens(LLM(merged(base, path), block_size=8, num_blocks=64).generate([prompt], GREEDY))[0]
            for name, path in dirs.items()}
    first = llm.generate([prompt], GREEDY, lora="a")[0].token_ids
    hits = llm.stats().hit_tokens
    second = llm.generate([prompt], GREEDY, lora="b")[0].token_ids
    assert llm.stats().hit_tokens == hits  # nothing of "a"'s KV is found for "b"
    assert (first, second) == (want["a"], want["b"]) and first != second
    again = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, n=2), lora="a")[0]
    assert llm.stats().hit_tokens > hits  # the same adapter shares its blocks
    assert [c.token_ids for c in again.outputs] == [want["a"]] * 2

    small = LLM(copy.deepcopy(base), block_size=4, num_blocks=16, max_num_seqs=8)  # 64 tokens: preempts
    for name, path in dirs.items():
        small.add_lora(name, path)
    names = list(dirs) * 2
    outs = small.generate([prompt[:30]] * len(names), SamplingParams(max_tokens=20, temperature=0), lora=names)
    assert small.engine.num_preemptions > 0
    long = {name: tokens(LLM(merged(base, path), block_size=8, num_blocks=64).generate(
        [prompt[:30]], SamplingParams(max_tokens=20, temperature=0)))[0] for name, path in dirs.items()}
    assert tokens(outs) == [long[n] for n in names]


# per transformers family: model class and config (names: transformers' model classes import
# triton, which must come after the kernel tests set TRITON_INTERPRET), weight scalings, two adapters' targets
HF_FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CONTEXT),
        lambda layer: [(layer.self_attn.q_proj, 8), (layer.self_attn.k_proj, 8), (layer.self_attn.o_proj, 30),
                       (layer.mlp.down_proj, 30)],
        (["q_proj", "v_proj"], ["gate_proj", "down_proj"])),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4),
             lambda layer: [(layer.attn.c_attn, 8), (layer.attn.c_proj, 30), (layer.mlp.c_proj, 30)],
             (["c_attn"], ["c_fc", "c_proj"])),  # Conv1D layers: PEFT records fan_in_fan_out
}


@pytest.fixture(scope="module", params=list(HF_FAMILIES))
def hf_dir(request, tmp_path_factory) -> tuple[str, Path]:
    """A tiny transformers model saved by save_pretrained (weights scaled like ``build``'s)."""
    transformers = pytest.importorskip("transformers")  # installed by the test command; the GPU image may lack it
    cls, config, fields, boosts, _ = HF_FAMILIES[request.param]
    path = tmp_path_factory.mktemp("hf") / request.param
    torch.manual_seed(0)
    hf = getattr(transformers, cls)(getattr(transformers, config)(**fields))
    body = hf.model if request.param == "llama" else hf.transformer
    with torch.no_grad():
        for layer in body.layers if request.param == "llama" else body.h:
            for module, factor in boosts(layer):
                module.weight.mul_(factor)
        (body.norm if request.param == "llama" else body.ln_f).weight.mul_(20)
    hf.save_pretrained(path)
    return request.param, path


def test_a_peft_library_adapter_serves_as_transformers_and_peft_generate(hf_dir, tmp_path):
    """(5) adapters saved by the peft library on a transformers model, served on its parallax
    import (``from_hf``) next to the base, give transformers + peft's greedy tokens."""
    peft = pytest.importorskip("peft")  # here: it imports triton (see HF_FAMILIES); the GPU image may lack it
    import transformers

    family, path = hf_dir
    cls, _, _, _, targets = HF_FAMILIES[family]
    cls = getattr(transformers, cls)
    common = dict(lora_alpha=8, init_lora_weights=False, fan_in_fan_out=family == "gpt2")
    configs = {"first": peft.LoraConfig(r=4, target_modules=targets[0], **common),
               "second": peft.LoraConfig(r=2, target_modules=targets[1], **common)}
    expected = {}
    prompts = PROMPTS[1:4]
    for k, (name, config) in enumerate(configs.items()):
        torch.manual_seed(10 + k)
        hf = peft.get_peft_model(cls.from_pretrained(path), config).eval()
        hf.save_pretrained(tmp_path / name)
        expected[name] = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                      max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                          for p in prompts]
    llm = LLM(from_hf(path), block_size=8, num_blocks=64)
    for name in configs:
        llm.add_lora(name, tmp_path / name)
    base = tokens(LLM(from_hf(path), block_size=8, num_blocks=64).generate(prompts, GREEDY))
    outs = llm.generate(prompts * 3, GREEDY, lora=["first"] * 3 + [None] * 3 + ["second"] * 3)
    assert tokens(outs) == expected["first"] + base + expected["second"]
    assert expected["first"] != base and expected["second"] != base


def test_bad_names_and_directories_are_refused(family, tmp_path):
    """(6) unknown adapter, duplicate name, missing or non-LoRA directory: ValueError naming what
    is wrong, and the engine unchanged."""
    base, dirs, llm = family
    engine = llm.engine
    with pytest.raises(ValueError, match=r"lora must be None .*\['a', 'b', 'c.v1'\].*'nope'"):
        engine.add_request([1, 2, 3], GREEDY, lora="nope")
    with pytest.raises(ValueError, match="lora"):
        llm.generate([[1, 2]], GREEDY, lora=["a", "b"])  # one per prompt
    with pytest.raises(ValueError, match="'a' is already in use"):
        engine.add_lora("a", dirs["b"])
    with pytest.raises(ValueError, match=f"path '{tmp_path / 'missing'}' is not a directory"):
        engine.add_lora("x", tmp_path / "missing")
    with pytest.raises(ValueError, match=f"path '{tmp_path}' has no adapter_config.json"):
        engine.add_lora("x", tmp_path)
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    (prefix / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="PREFIX_TUNING adapter"):
        engine.add_lora("x", prefix)
    other = tmp_path / "other"  # saved for a wider model
    wide = type(base)(dataclasses.replace(base.config, n_embd=base.config.n_embd * 2))
    target = ["c_attn"] if isinstance(base, GPT) else ["q_proj"]
    px.peft.get_peft_model(wide, px.peft.LoraConfig(r=2, target_modules=target)).save_adapter(other)
    with pytest.raises(ValueError, match="another base model"):
        engine.add_lora("x", other)
    assert engine.lora_names == ["a", "b", "c.v1"] and not engine.has_unfinished_requests()


def test_block_keys_chain_from_the_adapters_root():
    """BlockManager: a block cached for one adapter is found for that adapter only, also when a
    fork (n > 1) filled it after forking, and the base's blocks are not found for an adapter."""
    blocks = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    a, b = prefix_root("a"), prefix_root("b")
    assert blocks.allocate(0, 0, 2, root=a)  # 2 tokens: no full block before the fork
    blocks.fork(0, 1)
    assert blocks.allocate(1, 2, 7)  # the child fills two blocks (copy-on-write of the first)
    blocks.cache_full_blocks(1, tokens, 9)
    assert len(blocks.lookup(tokens, a)) == 2
    assert blocks.lookup(tokens, b) == [] and blocks.lookup(tokens) == []
    assert blocks.allocate(2, 0, 9, root=prefix_root(None))
    blocks.cache_full_blocks(2, tokens, 9)
    assert len(blocks.lookup(tokens)) == 2 and blocks.lookup(tokens, b) == []


def test_half_precision_base_routes_like_an_active_adapter(family):
    """A bfloat16 base keeps its adapters in float32 (as PEFT): routed rows equal the model with
    that adapter active (the unbatched LoraLinear path)."""
    base, dirs, _ = family
    half = copy.deepcopy(base).to(torch.bfloat16)
    llm = LLM(copy.deepcopy(half), block_size=8, num_blocks=64)
    for name, path in dirs.items():
        llm.add_lora(name, path)
    registry, model = llm.engine.loras, llm.engine.model
    idx = torch.tensor([p[:5] for p in PROMPTS[:3]])  # (3, 5)
    with torch.no_grad(), use_routing(registry.routing(torch.arange(3).repeat_interleave(5), idx.device)):
        got = model.logits(model.hidden_states(idx))
    assert got.dtype == torch.bfloat16
    for row, name in enumerate(registry.names):
        ref = px.peft.load_adapter(copy.deepcopy(half), dirs[name])
        with torch.no_grad():
            want = ref.logits(ref.hidden_states(idx[row:row + 1]))[0]
        torch.testing.assert_close(got[row], want)  # the same operations: equal here


def test_routing_under_autograd_keeps_the_graph(family):
    """Outside inference mode, with the weights requiring grad: the routed update (a constant, as
    sgmv is inference only; on CPU added in place into the base layer's output, which no backward
    reads) gives the same logits as under no_grad, and the base weights still get gradients."""
    _, _, llm = family
    registry, model = llm.engine.loras, llm.engine.model
    idx = torch.tensor([p[:5] for p in PROMPTS[:3]])  # (3, 5)
    routing = registry.routing(torch.tensor([0, 1, -1]).repeat_interleave(5), idx.device)
    with torch.no_grad(), use_routing(routing):
        want = model.logits(model.hidden_states(idx))
    weights = [layer.base_layer.weight for _, layer in lora_layers(model)]
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        with torch.enable_grad(), use_routing(routing):
            got = model.logits(model.hidden_states(idx))
            got.float().square().mean().backward()
        torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)
        assert all(w.grad is not None and bool(w.grad.abs().sum() > 0) for w in weights)
    finally:
        for w, flag in zip(weights, flags):
            w.grad = None
            w.requires_grad_(flag)


def test_an_adapter_added_between_steps_joins_the_running_batch(family):
    """add_lora while requests run (the server's load endpoint): they go on unchanged, and the
    new adapter's requests join the same batch with the right tokens."""
    base, dirs, reference = family
    engine = LLM(copy.deepcopy(base), block_size=8, num_blocks=64).engine
    engine.add_lora("a", dirs["a"])
    first = [engine.add_request(p, GREEDY, lora=n) for p, n in zip(PROMPTS[:2], ["a", None])]
    for _ in range(3):
        engine.step()
    engine.add_lora("c.v1", dirs["c.v1"])
    late = engine.add_request(PROMPTS[2], GREEDY, lora="c.v1")
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    want = tokens(reference.generate(PROMPTS[:3], GREEDY, lora=["a", None, "c.v1"]))
    assert [done[i] for i in [*first, late]] == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_engine_routes_through_the_sgmv_kernel_like_the_cpu_paths(family):
    """On CUDA every LoraLinear adds px.ops.sgmv's Triton kernel (one plan per step): the same
    greedy tokens as the CPU engine for a batch mixing every adapter and the base."""
    base, dirs, llm = family
    gpu = LLM(copy.deepcopy(base).cuda(), block_size=16, num_blocks=64)
    for name, directory in dirs.items():
        gpu.add_lora(name, directory)
    names = [*dirs, None]
    loras = [names[i % len(names)] for i in range(len(PROMPTS))]
    assert tokens(gpu.generate(PROMPTS, GREEDY, lora=loras)) == tokens(llm.generate(PROMPTS, GREEDY, lora=loras))
