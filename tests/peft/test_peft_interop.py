"""LoRA adapters move between parallax and Hugging Face PEFT both ways with the same logits
(tiny random transformers models, nothing downloaded)."""

import json

import pytest
import torch

import parallax as px
from parallax.models import from_hf
from tests.models.hf_models import assert_logits_match, hf_model

peft = pytest.importorskip("peft")

# llama: no biases, tied embeddings; qwen2: q/k/v biases; gpt2: HF Conv1D layers (fan_in_fan_out).
KINDS = ["llama", "qwen2", "gpt2"]


def randomize_adapters(model, seed: int = 0) -> None:
    """Non-zero A and B everywhere, so that every adapter tensor changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("kind", KINDS)
def test_parallax_adapter_loads_in_peft(tmp_path, kind):
    hf = hf_model(kind)
    ours = from_hf(hf)
    ours = px.peft.get_peft_model(ours, px.peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(ours)
    ours.save_adapter(tmp_path / "adapter")

    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    assert_logits_match(ours, theirs, atol=1e-5)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 8
    assert saved["fan_in_fan_out"] == (kind == "gpt2")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "c_attn"], "all-linear"])
def test_peft_adapter_loads_in_parallax(tmp_path, kind, targets):
    hf = hf_model(kind)
    ours = from_hf(hf)
    if kind == "gpt2":
        targets = targets if isinstance(targets, str) else ["c_attn"]
    elif not isinstance(targets, str):
        targets = ["q_proj", "v_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=True, init_lora_weights=False)
    theirs = peft.get_peft_model(hf, config)
    theirs.save_pretrained(tmp_path / "adapter")

    px.peft.load_adapter(ours, tmp_path / "adapter")
    assert_logits_match(ours, theirs, atol=1e-5)
    with ours.disable_adapter(), theirs.disable_adapter():
        assert_logits_match(ours, theirs, atol=1e-5)


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    source = px.peft.get_peft_model(from_hf(hf_model("llama")), px.peft.LoraConfig(r=2, target_modules=["q_proj"]))
    source.save_adapter(tmp_path / "adapter")
    frozen = px.peft.load_adapter(from_hf(hf_model("llama")), tmp_path / "adapter")
    trainable = px.peft.load_adapter(from_hf(hf_model("llama")), tmp_path / "adapter", is_trainable=True)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in source.named_parameters() if p.requires_grad}


def test_lora_on_a_transformers_model_equals_peft(tmp_path):
    """px.peft applies to a transformers model directly; its adapter is PEFT's on the same model."""
    ours = px.peft.get_peft_model(hf_model("qwen2"), px.peft.LoraConfig(r=4, target_modules="all-linear"))
    assert "lm_head" not in {n.split(".")[0] for n, _ in ours.named_parameters() if "lora_" in n}
    randomize_adapters(ours)
    ours.save_adapter(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf_model("qwen2"), tmp_path / "adapter")
    assert_logits_match(ours, theirs, atol=1e-5)
    with ours.disable_adapter():
        assert_logits_match(ours, hf_model("qwen2"), atol=1e-5)
    assert_logits_match(ours.merge_and_unload(), theirs, atol=1e-5)
