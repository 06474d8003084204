"""GPT.save / GPT.load: safetensors round trip, tied weights, atomic writes."""

import json
import os
import sys

import pytest
import torch

from parallax.models import GPT, GPTConfig
from parallax.models.gpt import CONFIG_METADATA_KEY

st = pytest.importorskip("safetensors.torch")


def small_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    fields = dict(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, dropout=0.1)
    return GPT(GPTConfig(**{**fields, **overrides}))


def test_round_trip(tmp_path):
    model = small_model(attention="math", bias=False)
    path = tmp_path / "model.safetensors"
    model.save(path)
    loaded = GPT.load(path)

    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left behind


def test_file_stores_tied_weight_once_and_config_as_json(tmp_path):
    model = small_model()
    path = tmp_path / "model.safetensors"
    model.save(str(path))
    with st.safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert GPTConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY])) == model.config


def test_load_keeps_dtype(tmp_path):
    model = small_model().to(torch.bfloat16)
    model.save(tmp_path / "m.safetensors")
    loaded = GPT.load(tmp_path / "m.safetensors")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)


def test_failed_write_leaves_existing_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    small_model(seed=0).save(path)
    before = path.read_bytes()

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        small_model(seed=1).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_overwrite_replaces_file(tmp_path):
    path = tmp_path / "model.safetensors"
    small_model(seed=0).save(path)
    second = small_model(seed=1)
    second.save(path)
    assert torch.equal(GPT.load(path).transformer.wte.weight, second.transformer.wte.weight)
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_load_rejects_file_without_config(tmp_path):
    path = tmp_path / "plain.safetensors"
    st.save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="GPT.save"):
        GPT.load(path)


def test_missing_safetensors_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        small_model().save(tmp_path / "m.safetensors")
    with pytest.raises(ImportError, match="pip install safetensors"):
        GPT.load(tmp_path / "m.safetensors")
