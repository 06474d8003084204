"""LoRA's semantics (PEFT's): targets, init, scaling, dropout, merging, several adapters, training
only the adapters, and a clear error with nothing changed for each bad input."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import parallax as px
from parallax.models import GPT, GPTConfig, Llama, LlamaConfig
from parallax.peft import LoraConfig, LoraLinear, get_peft_model, load_adapter
from tests.helpers import assert_close

VOCAB = 61


def tiny_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48,
                             block_size=32, attention_bias=True)).eval()


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0)).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(ids())


def lora_model(config: LoraConfig | None = None, seed: int = 0) -> Llama:
    """A tiny Llama with a random non-zero adapter "default" on q_proj and v_proj."""
    config = config or LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(tiny_llama(seed), config)


def lora_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters() if "lora_" in name}


# --- targets -----------------------------------------------------------------------------------

def test_list_targets_match_name_suffixes_and_keep_peft_parameter_names():
    model = lora_model()
    assert lora_names(model) == {f"model.layers.{i}.self_attn.{p}.{part}.default.weight"
                                 for i in range(2) for p in ("q_proj", "v_proj") for part in ("lora_A", "lora_B")}
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in dict(model.named_parameters())
    assert isinstance(model, Llama) and type(model).__name__ == "PeftLlama"


def test_regex_target_must_match_the_full_name():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj"))
    assert {name for name, m in model.named_modules() if isinstance(m, LoraLinear)} == \
        {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt])
def test_all_linear_targets_every_linear_but_the_output_head(make):
    plain = make()
    linears = {name for name, m in plain.named_modules() if isinstance(m, nn.Linear)}
    model = get_peft_model(plain, LoraConfig(target_modules="all-linear"))
    assert {name for name, m in model.named_modules() if isinstance(m, LoraLinear)} == linears - {"lm_head"}


# --- init, scaling, dropout ------------------------------------------------------------------------

def test_default_init_is_kaiming_uniform_a_and_zero_b_so_the_model_is_unchanged():
    expected = logits(tiny_llama())
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules="all-linear"))
    assert_close(logits(model), expected, atol=0, name="logits")
    layer = model.model.layers[0].mlp.down_proj
    bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)) on fan_in
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound and torch.all(B == 0)


def test_gaussian_init_has_std_one_over_r():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    A = torch.cat([layer.lora_A["default"].weight.flatten() for _, layer in px.peft.lora.lora_layers(model)])
    assert abs(A.std().item() - 1 / 4) < 0.02 and A.mean().abs() < 0.02
    assert all(torch.all(layer.lora_B["default"].weight == 0) for _, layer in px.peft.lora.lora_layers(model))


@pytest.mark.parametrize("use_rslora, scaling", [(False, 32 / 16), (True, 32 / 4)])
def test_forward_is_base_plus_scaled_low_rank_update(use_rslora, scaling):
    model = lora_model(LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj"], use_rslora=use_rslora,
                                  init_lora_weights=False))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, layer.in_features)
    base, A, B = layer.base_layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert layer.scaling["default"] == scaling
    assert_close(layer(x), base(x) + scaling * (x @ A.T) @ B.T, atol=1e-6, name="lora forward")


def test_dropout_applies_to_the_input_of_a_in_training_only():
    model = lora_model(LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5, init_lora_weights=False))
    layer = model.model.layers[0].self_attn.q_proj.train()
    x = torch.randn(4, layer.in_features)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    expected = layer.base_layer(x) + s * (F.dropout(x, 0.5, training=True) @ A.T) @ B.T
    assert_close(got, expected, atol=1e-6, name="train")
    layer.eval()
    assert_close(layer(x), layer.base_layer(x) + s * (x @ A.T) @ B.T, atol=1e-6, name="eval")


def test_half_precision_base_keeps_float32_adapters_and_its_output_dtype():
    model = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(target_modules=["o_proj"]))
    layer = model.model.layers[0].self_attn.o_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer(torch.randn(2, layer.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --- merging ---------------------------------------------------------------------------------------

def test_merge_unmerge_round_trip_and_merge_and_unload():
    model = lora_model()
    with_adapter, base_weight = logits(model), model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    model.merge()
    assert_close(logits(model), with_adapter, atol=1e-5, name="merged")
    model.unmerge()
    assert_close(model.model.layers[0].self_attn.q_proj.base_layer.weight, base_weight, atol=1e-6, name="unmerged")
    assert_close(logits(model), with_adapter, atol=1e-5, name="unmerged logits")

    plain = model.merge_and_unload()
    assert plain is model and type(plain) is Llama and not hasattr(plain, "peft_config")
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear and not lora_names(plain)
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())
    assert_close(logits(plain), with_adapter, atol=1e-5, name="merge_and_unload")


def test_disabled_adapter_gives_the_base_even_when_merged():
    base = logits(tiny_llama())
    model = lora_model()
    model.merge()
    with model.disable_adapter():
        assert_close(logits(model), base, atol=1e-5, name="disabled")
    assert not logits(model).equal(base)


# --- several adapters ------------------------------------------------------------------------------

def test_several_adapters_set_adapter_and_disable_adapter():
    base = logits(tiny_llama())
    model = lora_model(seed=0)
    first = logits(model)
    torch.manual_seed(5)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    assert_close(logits(model), first, atol=0, name="add_adapter keeps the active one")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".second." in n)

    model.set_adapter("second")
    second = logits(model)
    assert not second.equal(first) and not second.equal(base)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in lora_names(model) if ".second." in n}
    with model.disable_adapter():
        assert_close(logits(model), base, atol=0, name="disabled")
    assert_close(logits(model), second, atol=0, name="re-enabled")

    model.set_adapter(["default", "second"])
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, layer.in_features)
    both = layer.base_layer(x) + sum(layer.scaling[n] * layer.lora_B[n](layer.lora_A[n](x)) for n in ("default", "second"))
    assert_close(layer(x), both, atol=1e-6, name="two active adapters")


# --- training --------------------------------------------------------------------------------------

def test_only_adapter_parameters_train():
    model = lora_model(LoraConfig(r=4, target_modules="all-linear"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora_names(model)
    assert model.get_nb_trainable_parameters() == (sum(p.numel() for n, p in model.named_parameters() if n in trainable),
                                                   sum(p.numel() for p in model.parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(ids(), ids(2)).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not p.equal(before[n])}
    # B starts at zero, so A gets no gradient on the first step; every B moves.
    assert {n for n in trainable if ".lora_B." in n} <= changed <= trainable
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_save_adapter_writes_peft_keys(tmp_path):
    model = lora_model()
    model.save_adapter(tmp_path / "a")
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{n.replace('.default', '')}" for n in lora_names(model)}
    fields = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert fields["target_modules"] == ["q_proj", "v_proj"] and fields["task_type"] == "CAUSAL_LM"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_adapter_into_an_existing_directory_keeps_other_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer.json").write_text("{}")
    lora_model().save_adapter(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(px.peft.model, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        lora_model().save_adapter(tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_round_trip_through_files(tmp_path):
    model = lora_model()
    model.save_adapter(tmp_path / "a")
    loaded = load_adapter(tiny_llama(), tmp_path / "a")
    assert_close(logits(loaded), logits(model), atol=0, name="reloaded")
    load_adapter(loaded, tmp_path / "a", adapter_name="again")
    assert loaded.active_adapter == "default" and set(loaded.peft_config) == {"default", "again"}


# --- bad input: one clear error each, nothing changed ----------------------------------------------

@pytest.mark.parametrize("field, value, needle", [
    ("r", 0, "LoraConfig.r must be a positive integer"),
    ("r", 2.0, "LoraConfig.r"),
    ("lora_alpha", 0, "LoraConfig.lora_alpha"),
    ("lora_dropout", 1.0, r"LoraConfig.lora_dropout must be a probability in \[0, 1\)"),
    ("target_modules", [], "LoraConfig.target_modules"),
    ("target_modules", ["q_proj", 3], "LoraConfig.target_modules"),
    ("init_lora_weights", "pissa", r"LoraConfig.init_lora_weights must be one of \[True, False, 'gaussian'\]"),
    ("bias", "all", r"LoraConfig.bias must be one of \['none'\]"),
    ("use_rslora", 1, "LoraConfig.use_rslora"),
])
def test_bad_config_is_named(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        LoraConfig(**{field: value})


def assert_unchanged(model: nn.Module, reference: nn.Module) -> None:
    assert type(model) is type(reference) and not hasattr(model, "peft_config")
    assert list(model.state_dict()) == list(reference.state_dict())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("targets, needle", [
    (["q_proj", "qproj"], r"target_modules entries \['qproj'\] match no module"),
    (r"layers\.0\.q_proj", "pattern .* matches no module name"),
    (["mlp"], r"not nn.Linear: model.layers.0.mlp \(SwiGLU\)"),
    (["q_proj", "lm_head"], "selects the output head 'lm_head'; Llama computes its loss from lm_head.weight"),
])
def test_unmatched_or_wrong_target_is_named_and_nothing_changes(targets, needle):
    model = tiny_llama()
    with pytest.raises(ValueError, match=needle):
        get_peft_model(model, LoraConfig(target_modules=targets))
    assert_unchanged(model, tiny_llama())


def test_adapter_for_another_base_is_refused_naming_module_and_shapes(tmp_path):
    get_peft_model(tiny_gpt(), LoraConfig(r=4, target_modules=["c_attn"])).save_adapter(tmp_path / "gpt")
    torch.manual_seed(0)
    wider = GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=48, block_size=32))
    with pytest.raises(ValueError, match=r"another base model: transformer.h.0.attn.c_attn lora_A has shape "
                                         r"\(4, 32\) in the file but this model needs \(4, 48\)"):
        load_adapter(wider, tmp_path / "gpt")
    assert type(wider) is GPT and not any(isinstance(m, LoraLinear) for m in wider.modules())


def test_adapter_keys_that_match_no_layer_are_named(tmp_path):
    lora_model().save_adapter(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"keys \['model.layers.0.self_attn.v_proj.lora_A.weight'"):
        load_adapter(model, tmp_path / "a")
    assert_unchanged(model, tiny_llama())


@pytest.mark.parametrize("field, value", [("peft_type", "IA3"), ("use_dora", True),
                                          ("rank_pattern", {"q_proj": 2}), ("r", 0)])
def test_unsupported_adapter_config_is_named(tmp_path, field, value):
    lora_model().save_adapter(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    model = tiny_llama()
    with pytest.raises(ValueError, match=rf"adapter_config.json: .*{field}"):
        load_adapter(model, tmp_path / "a")
    assert_unchanged(model, tiny_llama())


def test_missing_adapter_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        load_adapter(tiny_llama(), tmp_path)


def test_misuse_of_adapter_names():
    model = lora_model()
    with pytest.raises(ValueError, match="already has LoRA adapters; use model.add_adapter"):
        get_peft_model(model, LoraConfig())
    with pytest.raises(ValueError, match="'default' already exists"):
        model.add_adapter("default", LoraConfig())
    with pytest.raises(ValueError, match=r"must be among \['default'\]; got 'other'"):
        model.set_adapter("other")
    with pytest.raises(ValueError, match="must be one of"):
        model.save_adapter("unused", adapter_name="other")


def test_planner_counts_optimizer_state_and_gradients_of_the_adapters_only():
    """px.plan on a LoRA model: gradients and Adam state for the adapters, the frozen base only as
    parameters (what ZeRO and memory_report hold, tests/peft/test_lora_zero.py)."""
    import parallax as px

    full = tiny_llama()
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    kwargs = dict(world_size=1, device_bytes="1GB", seq_len=16, stages=[0], precisions=["fp32"], offloads=["none"],
                  checkpointing=["none"], backend="gloo")
    full_row, lora_row = (px.plan(m, **kwargs).find(0, "fp32") for m in (full, lora))
    assert lora_row.optimizer_bytes == 2 * 4 * adapters  # two fp32 Adam moments per trainable element
    assert lora_row.grads_after_backward == 4 * adapters
    assert lora_row.param_bytes >= full_row.param_bytes  # the base stays, whole
    assert full_row.optimizer_bytes > 10 * lora_row.optimizer_bytes
