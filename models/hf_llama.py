"""Hugging Face Llama, Mistral, Qwen2 and Qwen3 <-> Llama: config fields both ways (weight names
are the same: ``Llama`` uses Hugging Face's).

Reading follows what transformers' modeling code for each architecture computes, field by field:
a field is mapped onto ``LlamaConfig``, harmless (it does not change the logits: token ids,
``use_cache``, ``dtype``, ``pretraining_tp``, which only splits the same matmuls into slices), or
refused with a ValueError naming it when parallax would compute something else (another
activation or rope type, a partial rotary embedding, per-layer sliding windows).
Both rope layouts are read: ``rope_parameters`` (what transformers 5 writes) and the top-level
``rope_theta`` / ``rope_scaling`` of published Llama 3 files (also with the older ``type`` key).
"""

from collections.abc import Mapping
from typing import Any

from .llama import Llama
from .llama_config import MODEL_TYPES, LlamaConfig
from .rope import ROPE_SCALING_KEYS, check_rope_scaling, rope_type

ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "LlamaModel": "llama",
    "MistralForCausalLM": "mistral", "MistralModel": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen2Model": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Qwen3Model": "qwen3",
}
MODEL_CLASS = Llama
EMBEDDING = "model.embed_tokens.weight"  # its stored dtype becomes the model's

_CAUSAL_LM = {model_type: arch for arch, model_type in ARCHITECTURES.items() if arch.endswith("ForCausalLM")}

# transformers' defaults (its config classes) for the fields a config.json may leave out.
_SHARED_DEFAULTS = dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, attention_dropout=0.0,
                        initializer_range=0.02, head_dim=None, num_key_value_heads=None)
_QWEN_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                      use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None)
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(_SHARED_DEFAULTS, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                  attention_bias=False, mlp_bias=False),
    "mistral": dict(_SHARED_DEFAULTS, vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=4096 * 32, sliding_window=4096, layer_types=None),
    "qwen2": dict(_SHARED_DEFAULTS, **_QWEN_DEFAULTS),
    "qwen3": dict(_SHARED_DEFAULTS, **_QWEN_DEFAULTS, head_dim=128, attention_bias=False),
}

# hidden_act names transformers maps to SiLU, the gate of SwiGLU.
SILU_NAMES = ("silu", "swish")
_LAYER_KINDS = ("full_attention", "sliding_attention")
_DEFAULT_THETA = 10000.0


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
    """LlamaConfig for an HF Llama / Mistral / Qwen2 / Qwen3 config (the dict in config.json);
    overrides replace fields. ValueError naming an HF field parallax cannot compute as transformers does."""
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"HF model_type must be one of {list(MODEL_TYPES)}; got {model_type!r}")
    c = {**HF_DEFAULTS[model_type], **hf_config}
    if c["hidden_act"] not in SILU_NAMES:
        raise ValueError(f"HF hidden_act must be one of {list(SILU_NAMES)} (SwiGLU's gate); got {c['hidden_act']!r}")
    theta, scaling = rope_from_hf(c)
    attention_bias, attention_out_bias, mlp_bias = _biases(c, model_type)
    fields = dict(
        model_type=model_type, block_size=c["max_position_embeddings"], vocab_size=c["vocab_size"],
        n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"], n_kv_head=c["num_key_value_heads"],
        n_embd=c["hidden_size"], head_dim=c["head_dim"] or None, intermediate_size=c["intermediate_size"],
        rms_norm_eps=c["rms_norm_eps"], rope_theta=theta, rope_scaling=scaling,
        attention_bias=attention_bias, attention_out_bias=attention_out_bias, mlp_bias=mlp_bias,
        qk_norm=model_type == "qwen3", tie_word_embeddings=c["tie_word_embeddings"],
        sliding_window=_sliding_window(c, model_type), dropout=c["attention_dropout"],
        initializer_range=c["initializer_range"],
    )
    return LlamaConfig.from_dict({**fields, **overrides})


def rope_from_hf(c: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, LlamaConfig.rope_scaling) from either layout; as transformers does, a
    non-empty ``rope_scaling`` wins over ``rope_parameters``."""
    field = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    params = c.get(field) or {}
    if not isinstance(params, dict):
        raise ValueError(f"HF {field} must be a dict or null; got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"HF {field} is given per layer type ({sorted(params)}); parallax uses one rotary "
                         "embedding for every layer")
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"HF partial_rotary_factor is {partial!r}; parallax rotates the whole head "
                         "(partial_rotary_factor 1.0)")
    theta = params.get("rope_theta", c.get("rope_theta", _DEFAULT_THETA))
    kind = rope_type(params)
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"HF {field} has rope_type {kind!r}, which parallax does not implement "
                         f"(supported: {sorted(ROPE_SCALING_KEYS)}); refusing to ignore it silently")
    scaling = {"rope_type": kind, **{k: params[k] for k in ROPE_SCALING_KEYS[kind] if k in params}}
    if kind == "llama3":
        # transformers takes a top-level value first, then the dict's, then max_position_embeddings.
        scaling["original_max_position_embeddings"] = (
            c.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
            or c["max_position_embeddings"])
    check_rope_scaling(f"HF {field}", scaling)
    return theta, scaling


def _biases(c: Mapping[str, Any], model_type: str) -> tuple[bool, bool, bool]:
    """(q/k/v bias, output-projection bias, MLP bias) as each architecture's modeling code builds them."""
    if model_type == "llama":
        return c["attention_bias"], c["attention_bias"], c["mlp_bias"]
    if model_type == "qwen2":
        return True, False, False
    if model_type == "qwen3":
        return c["attention_bias"], c["attention_bias"], False
    return False, False, False  # mistral


def _sliding_window(c: Mapping[str, Any], model_type: str) -> int | None:
    """The whole-model window, or None; ValueError when layers would differ (per-layer windows)."""
    if model_type == "llama":
        return None  # transformers' Llama has no window
    kinds = c.get("layer_types")
    if model_type == "mistral":
        # transformers' Mistral applies sliding_window to every layer whatever layer_types says
        # (it warns that such files are Ministral's, whose layers differ): refuse those.
        _check_uniform(kinds, "layer_types")
        return c["sliding_window"]
    window = c["sliding_window"] if c["use_sliding_window"] else None
    if window is None:
        return None
    if kinds is None:
        # Qwen's rule: layers from max_window_layers on use the window.
        kinds = ["sliding_attention" if i >= c["max_window_layers"] else "full_attention"
                 for i in range(c["num_hidden_layers"])]
        _check_uniform(kinds, "use_sliding_window with max_window_layers")
    else:
        _check_uniform(kinds, "layer_types")
    return window if kinds[0] == "sliding_attention" else None


def _check_uniform(kinds: list[str] | None, field: str) -> None:
    if kinds is None:
        return
    unknown = sorted(set(kinds) - set(_LAYER_KINDS))
    if unknown:
        raise ValueError(f"HF layer_types has attention kinds {unknown}; parallax knows {list(_LAYER_KINDS)}")
    if len(set(kinds)) > 1:
        raise ValueError(f"HF {field} gives layers different attention ({kinds}); parallax supports a sliding "
                         "window on every layer or on none, not per-layer windows")


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """The config.json fields of the transformers model of config.model_type equal to Llama(config);
    ValueError naming a LlamaConfig field that this model_type cannot express."""
    model_type = config.model_type
    _check_expressible(config)
    out: dict[str, Any] = {
        "architectures": [_CAUSAL_LM[model_type]], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": config.tie_word_embeddings,
        "rope_parameters": _rope_parameters(config), "attention_dropout": config.dropout,
        "initializer_range": config.initializer_range,
    }
    if model_type == "llama":
        out.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
    elif model_type == "mistral":
        out.update(sliding_window=config.sliding_window)
    else:
        window = config.sliding_window
        out.update(use_sliding_window=window is not None, sliding_window=window,
                   max_window_layers=0 if window is not None else config.n_layer,
                   layer_types=[_LAYER_KINDS[window is not None]] * config.n_layer)
        if model_type == "qwen3":
            out.update(attention_bias=config.attention_bias)
    return out


def _rope_parameters(config: LlamaConfig) -> dict[str, Any]:
    kind = rope_type(config.rope_scaling)
    return {"rope_type": kind, "rope_theta": config.rope_theta,
            **{k: config.rope_scaling[k] for k in ROPE_SCALING_KEYS[kind]}}


def _check_expressible(config: LlamaConfig) -> None:
    model_type = config.model_type
    # The value each architecture fixes, for the fields it does not make free.
    fixed: dict[str, Any] = {
        "llama": dict(qk_norm=False, sliding_window=None, attention_out_bias=config.attention_bias),
        "mistral": dict(qk_norm=False, attention_bias=False, attention_out_bias=False, mlp_bias=False),
        "qwen2": dict(qk_norm=False, attention_bias=True, attention_out_bias=False, mlp_bias=False),
        "qwen3": dict(qk_norm=True, attention_out_bias=config.attention_bias, mlp_bias=False),
    }[model_type]
    for name, value in fixed.items():
        if getattr(config, name) != value:
            raise ValueError(f"to_hf: model_type {model_type!r} needs LlamaConfig.{name}={value!r} "
                             f"(got {getattr(config, name)!r}); choose the model_type whose architecture has it")


def import_name(hf_name: str, config: LlamaConfig) -> str | None:
    """Llama's name for an HF tensor name (the *ForCausalLM's or the base *Model's), or None to skip it."""
    if hf_name == "lm_head.weight":
        return None if config.tie_word_embeddings else hf_name  # transformers ties it to embed_tokens
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None  # a buffer older transformers versions saved; recomputed from the config
    return hf_name if hf_name.startswith("model.") else "model." + hf_name


def export_name(name: str, config: LlamaConfig) -> str:
    """The HF name of Llama's tensor ``name`` (the same)."""
    return name


def transposed(name: str) -> bool:
    """Whether HF stores Llama's tensor ``name`` transposed (never: both use nn.Linear)."""
    return False
