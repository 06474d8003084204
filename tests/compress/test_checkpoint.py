"""px.compress.save / load: round trips (tied weights once, every family, registered modules),
atomic replacement, and loading through load_trained (--checkpoint of generate/eval)."""

import json

import pytest
import torch
from torch import nn

from parallax import compress
from parallax.compress.common import register_module, set_module, target_linears
from parallax.models import from_preset
from parallax.train.model_source import load_trained


@register_module
class _Scaled(nn.Module):
    """A registered stand-in for a compressed layer: a linear whose weight is stored in int8."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.scale = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.q.float() * self.scale[:, None]).t()

    def spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_spec(cls, spec: dict) -> "_Scaled":
        return cls(spec["in_features"], spec["out_features"])


def _replace_first(model: nn.Module) -> str:
    fqn, linear = target_linears(model)[0]
    new = _Scaled(linear.in_features, linear.out_features)
    with torch.no_grad():
        new.q.copy_(torch.randint(-127, 128, new.q.shape, dtype=torch.int8))
        new.scale.copy_(torch.rand(linear.out_features) * 0.01)
    set_module(model, fqn, new)
    return fqn


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_round_trip_keeps_outputs_ties_and_registered_modules(tmp_path, preset):
    torch.manual_seed(0)
    model = from_preset(preset).eval()
    fqn = _replace_first(model)
    x = torch.randint(0, model.config.vocab_size, (2, 11))
    compress.save(model, tmp_path / "c", steps=[{"method": "test"}])
    loaded = compress.load(tmp_path / "c")
    assert torch.equal(model(x), loaded(x))
    assert type(loaded.get_submodule(fqn)) is _Scaled
    assert loaded.get_submodule(fqn).q.dtype == torch.int8
    manifest = compress.read_manifest(tmp_path / "c")
    assert manifest["modules"][fqn]["kind"] == "_Scaled" and manifest["steps"] == [{"method": "test"}]
    if preset == "tiny":  # GPT ties the head to the token embedding: stored once, tied again on load
        assert manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_stored_bytes_follow_the_stored_dtypes(tmp_path):
    model = from_preset("tiny")
    compress.save(model, tmp_path / "dense")
    model.half()
    compress.save(model, tmp_path / "half")
    dense, half = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("dense", "half"))
    assert abs(half / dense - 0.5) < 0.01


def test_failed_save_leaves_the_previous_directory_intact(tmp_path, monkeypatch):
    model = from_preset("tiny")
    compress.save(model, tmp_path / "c", steps=[{"method": "first"}])
    before = (tmp_path / "c" / "model.safetensors").read_bytes()

    class Boom(RuntimeError):
        pass

    def failing_state_dict(*args, **kwargs):
        raise Boom("disk full")

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", failing_state_dict)
    with pytest.raises(Boom):
        compress.save(model, tmp_path / "c", steps=[{"method": "second"}])
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    assert compress.read_manifest(tmp_path / "c")["steps"] == [{"method": "first"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary directory left behind


def test_load_trained_reads_a_compressed_directory_with_its_tokenizer(tmp_path):
    from parallax.data import load_tokenizer

    torch.manual_seed(0)
    model = from_preset("tiny").eval()
    compress.save(model, tmp_path / "c", tokenizer=load_tokenizer("byte"))
    loaded, tok, source = load_trained(checkpoint=str(tmp_path / "c"))
    x = torch.randint(0, 257, (1, 5))
    assert torch.equal(model(x), loaded(x)) and tok.vocab_size == 257 and "compressed" in source


def test_bad_directories_are_named(tmp_path):
    with pytest.raises(ValueError, match="not a compressed model directory"):
        compress.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"parallax_compressed": {"version": 99}}))
    with pytest.raises(ValueError, match="version 99"):
        compress.load(tmp_path)
    with pytest.raises(ValueError, match=r"model: .*\.config"):
        compress.save(nn.Linear(2, 2), tmp_path / "x")
