"""HF config <-> LlamaConfig: transformers' defaults, harmless fields, and every field parallax would
otherwise ignore refused by name, on import (from_hf) and on export (to_hf)."""

import json

import pytest
import torch

from parallax.models import GPT, GPTConfig, Llama, LlamaConfig, from_hf, to_hf
from parallax.models.hf_llama import config_from_hf
from parallax.models.rope import inv_frequencies
from tests.models.hf_models import (
    assert_logits_match,
    hf_config,
    hf_model,
    load_hf_directory,
    transformers,
)

_CLASS_OF = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


@pytest.mark.parametrize("model_type", list(_CLASS_OF))
def test_defaults_are_transformers_defaults(model_type):
    # A config.json may leave any field out; transformers then uses its config class's default.
    ours = config_from_hf({"model_type": model_type})
    theirs = getattr(transformers, _CLASS_OF[model_type])()
    assert (ours.vocab_size, ours.n_embd, ours.intermediate_size) == (
        theirs.vocab_size, theirs.hidden_size, theirs.intermediate_size)
    assert (ours.n_layer, ours.n_head, ours.kv_heads, ours.head_dim) == (
        theirs.num_hidden_layers, theirs.num_attention_heads, theirs.num_key_value_heads,
        getattr(theirs, "head_dim", theirs.hidden_size // theirs.num_attention_heads))
    assert (ours.block_size, ours.rms_norm_eps, ours.tie_word_embeddings, ours.dropout) == (
        theirs.max_position_embeddings, theirs.rms_norm_eps, theirs.tie_word_embeddings, theirs.attention_dropout)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] and ours.rope_scaling is None
    assert ours.sliding_window == getattr(theirs, "sliding_window", None)


HARMLESS = {
    "llama": ({"use_cache": False, "bos_token_id": 5, "eos_token_id": [6, 7], "pad_token_id": 0},
              {"pretraining_tp": 2, "torch_dtype": "bfloat16", "transformers_version": "4.43.1"}),
    # Published Qwen2.5 configs (transformers 4.x, no layer_types) carry a window that applies only
    # with use_sliding_window, and use_mrope.
    "qwen2": ({"initializer_range": 0.01},
              {"use_sliding_window": False, "sliding_window": 4, "max_window_layers": 1, "use_mrope": False}),
}


@pytest.mark.parametrize("kind", list(HARMLESS))
def test_harmless_fields_are_accepted(tmp_path, kind):
    hf_fields, written_fields = HARMLESS[kind]
    hf = hf_model(kind, **hf_fields)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("layer_types", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, **written_fields}))
    ours = from_hf(tmp_path)
    assert ours.config.sliding_window is None
    assert_logits_match(ours, hf)


def test_mistral_without_a_window(tmp_path):
    hf = hf_model("mistral", sliding_window=None)
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert ours.config.sliding_window is None
    assert_logits_match(ours, hf)


def saved_config(model_type: str) -> dict:
    return json.loads(hf_config(model_type).to_json_string())


LAYERS_DIFFER = ["full_attention", "sliding_attention"]

# (model_type, fields written into config.json, the field the error must name)
REFUSED = [
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("mistral", {"hidden_act": "relu"}, "hidden_act"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope_type 'dynamic'"),
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters"),
    ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1e4}, "rope_scaling"),
    ("qwen3", {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type 'longrope'"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "low_freq_factor"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("qwen2", {"partial_rotary_factor": 0.25}, "partial_rotary_factor"),
    ("llama", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}},
               "layer_types": LAYERS_DIFFER}, "rope_parameters is given per layer type"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1, "layer_types": None},
     "max_window_layers"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "layer_types": LAYERS_DIFFER}, "layer_types"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "layer_types": ["chunked_attention"] * 2},
     "layer_types"),
    ("mistral", {"layer_types": LAYERS_DIFFER}, "layer_types"),
    ("llama", {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, "quantization_config"),
    ("qwen2", {"auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}, "auto_map"),
    ("llama", {"model_type": "gemma"}, "model_type 'gemma'"),
    ("llama", {"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ("gpt2", {"activation_function": "relu"}, "activation_function"),
    ("gpt2", {"tie_word_embeddings": False}, "tie_word_embeddings"),
]


@pytest.mark.parametrize("model_type, fields, named", REFUSED, ids=[f"{m}-{'-'.join(f)}" for m, f, _ in REFUSED])
def test_refused_config_field_is_named(tmp_path, model_type, fields, named):
    (tmp_path / "config.json").write_text(json.dumps({**saved_config(model_type), **fields}))
    with pytest.raises(ValueError, match=named) as e:
        from_hf(tmp_path)  # the config is refused before any weights are looked for
    assert str(tmp_path / "config.json") in str(e.value)


def test_model_object_config_is_checked_too():
    hf = hf_model("llama")
    hf.config.hidden_act = "gelu_new"
    with pytest.raises(ValueError, match="LlamaForCausalLM object: HF hidden_act"):
        from_hf(hf)


def test_config_json_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(tmp_path)


def test_config_json_must_be_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        from_hf(tmp_path)


def test_model_type_from_architectures(tmp_path):
    hf = hf_model("qwen3")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert from_hf(tmp_path).config.model_type == "qwen3"


# ---------------------------------------------------------------------------- export

TINY = dict(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96)

# (model_type, LlamaConfig fields, the field the error must name)
NOT_EXPRESSIBLE = [
    ("llama", {"qk_norm": True}, "qk_norm"),
    ("llama", {"attention_out_bias": True}, "attention_out_bias"),
    ("llama", {"sliding_window": 8}, "sliding_window"),
    ("mistral", {"attention_bias": True}, "attention_bias"),
    ("mistral", {"mlp_bias": True}, "mlp_bias"),
    ("qwen2", {"attention_bias": False}, "attention_bias"),
    ("qwen2", {"attention_bias": True, "attention_out_bias": True}, "attention_out_bias"),
    ("qwen3", {"qk_norm": False}, "qk_norm"),
    ("qwen3", {"qk_norm": True, "mlp_bias": True}, "mlp_bias"),
]


@pytest.mark.parametrize("model_type, fields, named", NOT_EXPRESSIBLE,
                         ids=[f"{m}-{'-'.join(f)}" for m, f, _ in NOT_EXPRESSIBLE])
def test_export_refuses_what_the_model_type_cannot_express(tmp_path, model_type, fields, named):
    model = Llama(LlamaConfig(model_type=model_type, **TINY, **fields))
    with pytest.raises(ValueError, match=f"LlamaConfig.{named}"):
        to_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields, named", [({"bias": False}, "bias"), ({"n_kv_head": 2}, "n_kv_head")])
def test_gpt2_export_refuses_what_gpt2_cannot_express(tmp_path, fields, named):
    model = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=1, n_head=4, n_embd=32, **fields))
    with pytest.raises(ValueError, match=f"GPTConfig.{named}"):
        to_hf(model, tmp_path / "out")


@pytest.mark.parametrize("rope_scaling", [
    None, {"rope_type": "linear", "factor": 2.0}, {"type": "linear", "factor": 3.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16}])
def test_exported_rope_parameters(tmp_path, rope_scaling):
    model = Llama(LlamaConfig(model_type="llama", **TINY, rope_theta=50000.0, rope_scaling=rope_scaling))
    to_hf(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert written["rope_theta"] == 50000.0 and "type" not in written
    theirs = load_hf_directory(tmp_path)
    cfg = model.config
    assert torch.equal(theirs.model.rotary_emb.inv_freq, inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    assert from_hf(tmp_path).config.rope_scaling == (
        None if rope_scaling is None else {"rope_type": written["rope_type"], **{
            k: v for k, v in rope_scaling.items() if k not in ("type", "rope_type")}})
