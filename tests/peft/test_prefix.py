"""Prefix tuning: parallax and Hugging Face PEFT load each other's adapters and give the same
logits; only the prefix trains; the inference engine serves a prefix-tuned model; bad input is
refused before anything changes. Tiny random-initialised transformers models, nothing downloaded."""

import random

import pytest
import torch

from parallax.inference import EngineConfig, LLMEngine, SamplingParams
from parallax.models import from_hf
from parallax.peft.prefix import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PrefixTuningConfig,
    add_prefix_tuning,
    load_prefix_adapter,
    prefix_adapter_state_dict,
    save_prefix_adapter,
)
from tests.helpers import assert_close
from tests.inference.test_engine_families import recompute_greedy, run_all
from tests.models.hf_models import VOCAB, hf_model

peft = pytest.importorskip("peft")

P = 5  # virtual tokens
# llama: grouped-query attention (4 query heads, 2 KV heads), Llama 3 rope scaling; mistral: a
# sliding window (6) shorter than the virtual tokens plus the input; gpt2: learned positions.
KINDS = ["llama", "mistral", "gpt2"]


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def ids(B: int = 2, T: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def prefix_tuned(kind: str, projection: bool, seed: int = 3) -> torch.nn.Module:
    """A parallax model imported from a tiny transformers model, with a random prefix adapter."""
    model = from_hf(hf_model(kind)).eval()
    torch.manual_seed(seed)
    return add_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection,
                                                       encoder_hidden_size=24 if projection else None))


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_parallax_adapter_loads_in_peft_with_the_same_logits(tmp_path, kind, projection):
    ours = prefix_tuned(kind, projection)
    save_prefix_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf_model(kind), tmp_path / "adapter").eval()
    x = ids()
    with torch.no_grad():
        assert_close(ours(x), theirs(input_ids=x).logits, atol=1e-5, name=f"{kind} logits")


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_loads_in_parallax_with_the_same_logits(tmp_path, kind, projection):
    torch.manual_seed(4)
    theirs = peft.get_peft_model(hf_model(kind), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=24)).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_prefix_adapter(from_hf(hf_model(kind)).eval(), tmp_path / "adapter")
    x = ids()
    with torch.no_grad():
        assert_close(ours(x), theirs(input_ids=x).logits, atol=1e-5, name=f"{kind} logits")


def test_state_dict_has_peft_key_and_layout():
    model = prefix_tuned("llama", projection=False)
    encoder = model.prompt_encoder["default"]
    table = prefix_adapter_state_dict(model)["prompt_embeddings"]
    # 2 layers x (keys, values) x 2 KV heads x head size 16: PEFT sizes the prefix by the KV heads
    assert table.shape == (P, 2 * 2 * 2 * 16)
    k1, v1 = encoder(1)
    rows = table.view(P, 4, 2, 16)
    assert torch.equal(k1, rows[:, 2]) and torch.equal(v1, rows[:, 3])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]


@pytest.mark.parametrize("projection", [False, True])
def test_a_training_step_changes_only_the_prefix(projection):
    model = prefix_tuned("llama", projection).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    x = ids(T=10)
    model(x[:, :-1], x[:, 1:]).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if name.startswith("prompt_encoder."):
            assert p.grad is not None and not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_engine_greedy_equals_full_recompute(kind):
    """Chunked prefill, decodes, preemption and recomputation with the virtual tokens in every layer."""
    model = prefix_tuned(kind, projection=True)
    rng = random.Random(5)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (1, 4, 11, 19)]
    engine = LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=12, max_num_seqs=3,
                                                  max_num_batched_tokens=8, max_model_len=40,
                                                  attention="auto"))
    outs = run_all(engine, prompts, SamplingParams(max_tokens=8, temperature=0), rng)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == recompute_greedy(model, prompt, 8), len(prompt)
    assert engine.num_preemptions > 0, "the pool was meant to force preemption"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_serves_a_prefix_tuned_model():
    """On CUDA "auto" would pick the paged kernels; a prefix-tuned model is served by SDPA instead."""
    model = prefix_tuned("llama", projection=True).cuda()
    rng = random.Random(6)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (2, 13, 21)]
    engine = LLMEngine(model, config=EngineConfig(block_size=16, num_blocks=16, max_model_len=64))
    assert engine.runner.attention == "torch"
    outs = run_all(engine, prompts, SamplingParams(max_tokens=8, temperature=0), rng)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == recompute_greedy(model, prompt, 8), len(prompt)


def test_engine_context_leaves_room_for_the_virtual_tokens():
    """GPT-2's 64 learned positions hold the 5 virtual tokens and at most 59 real ones."""
    model = prefix_tuned("gpt2", projection=False)
    assert LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=16)).max_model_len == 59
    with pytest.raises(ValueError, match="max_model_len=64 .*block_size=64 less 5 prefix-tuning virtual tokens"):
        LLMEngine(model, config=EngineConfig(block_size=4, num_blocks=16, max_model_len=64))


def test_engine_refuses_paged_kernels_for_a_prefix():
    with pytest.raises(ValueError, match="prefix-tuned"):
        LLMEngine(prefix_tuned("llama", projection=False), config=EngineConfig(num_blocks=8, attention="paged"))


@pytest.mark.parametrize("field, value", [("num_virtual_tokens", 0), ("num_virtual_tokens", 2.0),
                                          ("encoder_hidden_size", -1), ("prefix_projection", "yes"),
                                          ("init_weights", "gaussian"), ("task_type", "SEQ_2_SEQ_LM")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PrefixTuningConfig(**{field: value})


def test_config_that_does_not_match_the_model_names_the_field():
    model = from_hf(hf_model("llama"))
    with pytest.raises(ValueError, match="token_dim=64 does not match.*token_dim=32"):
        add_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=P, token_dim=64))
    assert_unchanged(model)


def assert_unchanged(model: torch.nn.Module) -> None:
    assert not hasattr(model, "prompt_encoder") and model.position_offset == 0
    assert all(p.requires_grad for p in model.parameters())


def test_adapter_for_another_base_names_both_shapes(tmp_path):
    save_prefix_adapter(prefix_tuned("llama", projection=False), tmp_path / "adapter")
    other = from_hf(hf_model("llama", num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"another base.*\(5, 128\).*needs \(5, 192\)"):
        load_prefix_adapter(other, tmp_path / "adapter")
    assert_unchanged(other)


def test_loading_a_lora_adapter_directory_is_refused(tmp_path):
    (tmp_path / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": 8}')
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    model = from_hf(hf_model("llama"))
    with pytest.raises(ValueError, match="peft_type 'LORA'"):
        load_prefix_adapter(model, tmp_path)
    assert_unchanged(model)


def test_a_failed_save_leaves_the_old_adapter_and_no_debris(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    first = prefix_tuned("llama", projection=False, seed=1)
    save_prefix_adapter(first, target)
    saved = (target / WEIGHTS_NAME).read_bytes(), (target / CONFIG_NAME).read_text()

    def failing_write(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pathlib.Path.write_text", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_prefix_adapter(prefix_tuned("llama", projection=False, seed=2), target)
    assert ((target / WEIGHTS_NAME).read_bytes(), (target / CONFIG_NAME).read_text()) == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt2"])
def test_packed_examples_each_see_the_prefix_as_if_alone(kind):
    """Packing composes with prefix tuning: every example attends to the virtual tokens and then
    only to itself, at positions P, P + 1, ... (mistral's window counts the virtual tokens)."""
    model = prefix_tuned(kind, projection=False)
    examples = [ids(1, T, seed=T)[0] for T in (4, 7, 3)]
    packed = torch.cat(examples)[None]  # (1, 14)
    positions = torch.cat([torch.arange(len(e)) for e in examples])[None]
    with torch.no_grad():
        got = model(packed, positions=positions)[0]
        alone = torch.cat([model(e[None])[0] for e in examples])
    assert_close(got, alone, atol=1e-5, name=f"{kind} packed logits")


def test_public_api_dispatches_prefix_tuning(tmp_path):
    """px.peft.get_peft_model / save_adapter / load_adapter take prefix tuning as they take LoRA."""
    import parallax as px

    torch.manual_seed(5)
    model = px.peft.get_peft_model(from_hf(hf_model("llama")).eval(), px.peft.PrefixTuningConfig(num_virtual_tokens=P))
    assert isinstance(model, px.peft.PrefixModelMixin)
    trainable, total = model.get_nb_trainable_parameters()
    assert 0 < trainable < total
    model.save_adapter(tmp_path / "adapter")
    loaded = px.peft.load_adapter(from_hf(hf_model("llama")).eval(), tmp_path / "adapter")
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference unless is_trainable
    x = ids()
    with torch.no_grad():
        assert_close(loaded(x), model(x), atol=1e-6, name="reloaded logits")
    with pytest.raises(ValueError, match="no weights to merge"):
        model.merge_and_unload()
