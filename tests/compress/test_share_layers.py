"""Cross-layer weight sharing (``share_layers``): one module per group of consecutive blocks, equal
outputs to an unshared model holding copies, parameters counted and stored once, checkpoints,
Hugging Face export and the paged engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from parallax.inference import LLM, SamplingParams
from parallax.models import GPT, build_model, from_hf, from_preset, to_hf

CONFIGS = {
    "gpt": dict(preset="tiny", n_layer=4, n_embd=32, n_head=2, block_size=32),
    "llama": dict(preset="llama-tiny", n_layer=4, n_embd=32, n_head=2, n_kv_head=1, intermediate_size=48,
                  block_size=32),
}


def _shared(family: str, k: int = 2) -> torch.nn.Module:
    fields = dict(CONFIGS[family])
    torch.manual_seed(0)
    return from_preset(fields.pop("preset"), share_layers=k, **fields)


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _unshared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same model without sharing: every position holds its own copy of its group's weights."""
    config = dataclasses.replace(model.config, share_layers=1)
    plain = build_model(config)
    plain.load_state_dict(model.state_dict())
    return plain


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_shared_model_equals_unshared_copies_and_has_fewer_parameters(family):
    model = _shared(family)
    blocks = _blocks(model)
    assert blocks[0] is blocks[1] and blocks[2] is blocks[3] and blocks[1] is not blocks[2]
    plain = _unshared_copy(model)
    idx = torch.randint(0, model.config.vocab_size, (2, 11))
    torch.testing.assert_close(model(idx), plain(idx), rtol=0, atol=0)
    per_block = sum(p.numel() for p in blocks[0].parameters())
    count = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in plain.parameters()) - count == 2 * per_block  # 4 blocks stored as 2


def test_gradient_sums_over_every_use():
    model = _shared("gpt")
    plain = _unshared_copy(model)
    idx = torch.randint(0, 257, (2, 9))
    model(idx, idx).backward()
    plain(idx, idx).backward()
    got = model.transformer.h[0].mlp.c_fc.weight.grad
    want = plain.transformer.h[0].mlp.c_fc.weight.grad + plain.transformer.h[1].mlp.c_fc.weight.grad
    torch.testing.assert_close(got, want)


def test_n_layer_must_be_a_multiple():
    with pytest.raises(ValueError, match=r"GPTConfig.n_layer \(4\) must be a multiple of share_layers \(3\)"):
        from_preset("tiny", n_layer=4, share_layers=3)
    with pytest.raises(ValueError, match=r"LlamaConfig.share_layers"):
        from_preset("llama-tiny", share_layers=0)


def test_save_stores_each_shared_tensor_once_and_reloads(tmp_path):
    from safetensors import safe_open

    model = _shared("gpt")
    model.save(tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.h.0.attn.c_attn.weight" in keys and "transformer.h.2.attn.c_attn.weight" in keys
    assert not any(k.startswith(("transformer.h.1.", "transformer.h.3.")) for k in keys)
    loaded = GPT.load(tmp_path / "m.safetensors")
    assert loaded.transformer.h[0] is loaded.transformer.h[1]
    idx = torch.randint(0, 257, (1, 7))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_to_hf_writes_every_layer_for_transformers(family, tmp_path):
    model = _shared(family)
    to_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    idx = torch.randint(0, model.config.vocab_size, (1, 8))
    torch.testing.assert_close(hf(idx).logits, model(idx), rtol=1e-4, atol=1e-4)
    assert from_hf(tmp_path / "hf").config.share_layers == 1  # Hugging Face records no sharing


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_paged_engine_generates_as_full_recompute(family):
    """Each call of a shared attention layer keeps its own keys and values in the cache."""
    model = _shared(family).eval()
    with torch.no_grad():  # sharper attention than the random init's, so that wrong keys change tokens
        for p in _blocks(model).parameters():
            p.mul_(6.0)
    prompt = [5, 17, 42, 7, 99, 3, 250, 31]
    out = LLM(model, block_size=8, num_blocks=16).generate([prompt], SamplingParams(max_tokens=12, temperature=0))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out[0].token_ids == ids[0, len(prompt):].tolist()


def test_train_share_layers_flag_checkpoint_stores_shared_weights_once(tmp_path, monkeypatch, capsys):
    from parallax import checkpoint
    from parallax.cli import main
    from parallax.finetune.config import FinetuneConfig
    from parallax.train import ConfigError
    from parallax.train.checkpoints import load_model

    monkeypatch.setenv("PARALLAX_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--preset", "llama-tiny", "--share-layers", "2", "--model", "n_embd=32", "--model",
                 "n_head=2", "--model", "intermediate_size=48", "--out", str(out), "--steps", "2", "--batch-size",
                 "2", "--block-size", "16", "--eval-interval", "2", "--eval-batches", "1", "--checkpoint-interval",
                 "2", "--sample-tokens", "0"]) == 0
    step = out / "checkpoints/step_000002"
    tensors, manifest = checkpoint.full_tensors(step)
    assert "model.layers.0.mlp.gate_proj.weight" in tensors
    assert not any(name.startswith(("model.layers.1.", "model.layers.3.")) for name in tensors)
    assert manifest["aliases"]["model.layers.1.mlp.gate_proj.weight"] == "model.layers.0.mlp.gate_proj.weight"
    model = load_model(step)
    assert model.config.share_layers == 2 and model.model.layers[0] is model.model.layers[1]
    torch.testing.assert_close(model.model.layers[2].mlp.up_proj.weight, tensors["model.layers.2.mlp.up_proj.weight"])
    capsys.readouterr()
    assert main(["train", "--hf", str(tmp_path), "--share-layers", "2", "--out", str(tmp_path / "x")]) == 2
    assert "share_layers: weight sharing is for training from scratch" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="share_layers: weight sharing is for training from scratch"):
        FinetuneConfig(base=str(out), share_layers=2)
