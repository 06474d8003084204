"""GPTConfig: validation messages name the field, presets, dict/JSON/TOML round trips."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parallax.models import ATTENTION_BACKENDS, PRESETS, GPTConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_size", 0),
        ("vocab_size", -3),
        ("n_layer", 0),
        ("n_head", 0),
        ("n_embd", 0),
        ("n_kv_head", 0),
        ("n_layer", 2.5),
        ("n_layer", True),
        ("block_size", "128"),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("dropout", "0.1"),
        ("bias", 1),
        ("layer_norm_eps", 0.0),
        ("attention", "flash-v9"),
    ],
)
def test_bad_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        GPTConfig(**{field: value})


def test_n_embd_not_divisible_by_n_head():
    with pytest.raises(ValueError, match="n_embd") as e:
        GPTConfig(n_embd=100, n_head=3)
    assert "n_head" in str(e.value)


def test_n_head_not_multiple_of_n_kv_head():
    with pytest.raises(ValueError, match="n_kv_head") as e:
        GPTConfig(n_head=12, n_kv_head=5)
    assert "n_head" in str(e.value)


def test_unknown_attention_lists_allowed_backends():
    with pytest.raises(ValueError) as e:
        GPTConfig(attention="nope")
    for name in ATTENTION_BACKENDS:
        assert repr(name) in str(e.value)


def test_fields_are_keyword_only():
    with pytest.raises(TypeError):
        GPTConfig(128)


def test_kv_heads_defaults_to_n_head():
    assert GPTConfig(n_head=8, n_embd=64).kv_heads == 8
    assert GPTConfig(n_head=8, n_kv_head=2, n_embd=64).kv_heads == 2
    assert GPTConfig(n_head=8, n_embd=64).head_dim == 8


def test_presets():
    tiny = GPTConfig.from_preset("tiny")
    assert (tiny.vocab_size, tiny.block_size, tiny.n_layer, tiny.n_head, tiny.n_embd) == (257, 128, 4, 4, 128)
    gpt2 = GPTConfig.from_preset("gpt2")
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd) == (12, 12, 768)
    assert (gpt2.block_size, gpt2.vocab_size) == (1024, 50257)
    medium = GPTConfig.from_preset("gpt2-medium")
    assert (medium.n_layer, medium.n_head, medium.n_embd) == (24, 16, 1024)
    for name in PRESETS:
        GPTConfig.from_preset(name)  # every preset is valid


def test_preset_overrides_are_validated():
    assert GPTConfig.from_preset("tiny", n_layer=2, attention="math").n_layer == 2
    with pytest.raises(ValueError, match="GPTConfig.n_kv_head"):
        GPTConfig.from_preset("tiny", n_kv_head=3)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="gpt3") as e:
        GPTConfig.from_preset("gpt3")
    for name in PRESETS:
        assert repr(name) in str(e.value)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_dict({"n_layers": 2})


@settings(max_examples=50, deadline=None)
@given(
    n_kv_head=st.sampled_from([None, 1, 2, 4]),
    n_layer=st.integers(1, 64),
    head_dim=st.integers(1, 128),
    dropout=st.floats(0.0, 0.99),
    bias=st.booleans(),
    attention=st.sampled_from(sorted(ATTENTION_BACKENDS)),
)
def test_round_trip_through_json_and_toml(n_kv_head, n_layer, head_dim, dropout, bias, attention):
    config = GPTConfig(
        n_kv_head=n_kv_head, n_layer=n_layer, n_head=4, n_embd=4 * head_dim,
        dropout=dropout, bias=bias, attention=attention,
    )
    assert GPTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    tomllib = pytest.importorskip("tomllib")  # stdlib from Python 3.11
    toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in config.to_dict().items())  # flat TOML
    assert GPTConfig.from_dict(tomllib.loads(toml)) == config
