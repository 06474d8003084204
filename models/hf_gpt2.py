"""Hugging Face GPT-2 <-> GPT: config fields and weight names both ways.

HF's GPT-2 uses Conv1D layers, which store weights as (in, out) where nn.Linear stores (out, in):
those four weights per block are transposed on the way in and out.
"""

from collections.abc import Mapping
from typing import Any

from .config import GPTConfig
from .gpt import GPT

MODEL_TYPES = ("gpt2",)
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2"}
MODEL_CLASS = GPT
EMBEDDING = "transformer.wte.weight"  # its stored dtype becomes the model's

# HF activation names that compute GPT-2's tanh-approximated GELU.
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# HF config fields that change the computation, with the only value GPT supports.
_REQUIRED_HF_VALUES = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

# transformers' GPT2Config end-of-text id; written only when the vocabulary has it.
_GPT2_EOS = 50256


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """GPTConfig for an HF GPT-2 config (the dict in config.json); overrides replace fields."""
    model_type = hf_config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"HF model_type must be 'gpt2'; got {model_type!r}")
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in TANH_GELU_NAMES:
        raise ValueError(f"HF activation_function must be one of {list(TANH_GELU_NAMES)}; got {activation!r}")
    for name, required in _REQUIRED_HF_VALUES.items():
        if hf_config.get(name, required) != required:
            raise ValueError(f"HF {name} must be {required} to import into GPT; got {hf_config[name]!r}")
    n_embd = hf_config["n_embd"]
    n_inner = hf_config.get("n_inner")
    fields: dict[str, Any] = dict(
        block_size=hf_config["n_positions"],
        vocab_size=hf_config["vocab_size"],
        n_layer=hf_config["n_layer"],
        n_head=hf_config["n_head"],
        n_embd=n_embd,
        # HF's None means 4 * n_embd, as GPTConfig's does; an explicit 4 * n_embd is kept as None.
        n_inner=None if n_inner == 4 * n_embd else n_inner,
        bias=True,
        layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
    )
    if "dropout" not in overrides:
        # GPT has one dropout probability; HF has three that are equal in every GPT-2 release.
        pdrops = {k: hf_config.get(k, 0.1) for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop")}
        if len(set(pdrops.values())) != 1:
            raise ValueError(f"HF dropouts differ ({pdrops}); pass dropout=... to choose GPTConfig.dropout")
        fields["dropout"] = pdrops["resid_pdrop"]
    return GPTConfig.from_dict({**fields, **overrides})


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """The config.json fields of a GPT2LMHeadModel equal to GPT(config); ValueError naming a field
    that GPT-2 cannot express."""
    if not config.bias:
        raise ValueError("to_hf: GPT-2 has biases in every Linear and LayerNorm; GPTConfig.bias=False cannot be "
                         "exported as model_type 'gpt2'")
    if config.kv_heads != config.n_head:
        raise ValueError(f"to_hf: GPT-2 has no grouped-query attention; GPTConfig.n_kv_head must be None "
                         f"(got {config.n_kv_head})")
    eos = _GPT2_EOS if config.vocab_size > _GPT2_EOS else None
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.n_inner,
        "activation_function": "gelu_new", "layer_norm_epsilon": config.layer_norm_eps,
        "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "resid_pdrop": config.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "tie_word_embeddings": True, "initializer_range": 0.02,
        "bos_token_id": eos, "eos_token_id": eos,
    }


def import_name(hf_name: str, config: GPTConfig) -> str | None:
    """GPT's name for an HF tensor name (GPT2LMHeadModel's or GPT2Model's), or None to skip it."""
    if hf_name == "lm_head.weight":
        return None  # tied to wte (tie_word_embeddings is checked in config_from_hf)
    if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # causal-mask buffers that older transformers versions saved
    return hf_name if hf_name.startswith("transformer.") else "transformer." + hf_name


def export_name(name: str, config: GPTConfig) -> str:
    """The GPT2LMHeadModel name of GPT's tensor ``name``."""
    return name


def transposed(name: str) -> bool:
    """Whether HF stores GPT's tensor ``name`` transposed (a Conv1D weight)."""
    return name.endswith(_CONV1D_SUFFIXES)
