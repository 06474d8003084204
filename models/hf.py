"""Hugging Face GPT-2 import: map HF config fields and weight names onto GPTConfig and GPT's.

Reads a ``save_pretrained`` directory directly (transformers not needed) or takes a
``transformers`` GPT2LMHeadModel / GPT2Model object, duck-typed (transformers is never imported).
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .config import GPTConfig
from .weights import require_safetensors

# HF activation names that compute GPT-2's tanh-approximated GELU.
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

# HF's Conv1D stores weights as (in, out); nn.Linear stores (out, in).
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# HF config fields that change the computation, with the only value GPT supports.
_REQUIRED_HF_VALUES = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}


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
    if hf_config.get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(
            f"HF n_inner must be None or 4 * n_embd = {4 * n_embd}; got {hf_config['n_inner']!r}"
        )
    fields: dict[str, Any] = dict(
        block_size=hf_config["n_positions"],
        vocab_size=hf_config["vocab_size"],
        n_layer=hf_config["n_layer"],
        n_head=hf_config["n_head"],
        n_embd=n_embd,
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


def state_dict_from_hf(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT state dict (tied embedding stored once, under transformer.wte.weight) from HF tensors.

    Accepts GPT2LMHeadModel names (``transformer.h.0...``) and GPT2Model / hub names (``h.0...``).
    Returns views of the HF tensors (Conv1D weights transposed); loading copies them.
    """
    state = {}
    for key, tensor in hf_state.items():
        if key == "lm_head.weight":
            continue  # tied to wte (tie_word_embeddings is checked in config_from_hf)
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers that older transformers versions saved
        name = key if key.startswith("transformer.") else "transformer." + key
        state[name] = tensor.t() if name.endswith(_CONV1D_SUFFIXES) else tensor
    return state


def read_hf(
    source: "str | os.PathLike | nn.Module", **overrides: Any
) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(GPTConfig, GPT state dict) from a save_pretrained directory or an HF model object."""
    if isinstance(source, (str, os.PathLike)):
        hf_config, hf_state = _read_hf_directory(os.fspath(source))
    else:
        hf_config, hf_state = source.config.to_dict(), source.state_dict()
    return config_from_hf(hf_config, **overrides), state_dict_from_hf(hf_state)


def _read_hf_directory(directory: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    with open(os.path.join(directory, "config.json")) as f:
        hf_config = json.load(f)
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    pickled = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(single):
        return hf_config, require_safetensors().load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(require_safetensors().load_file(os.path.join(directory, shard)))
        return hf_config, state
    if os.path.exists(pickled):
        return hf_config, torch.load(pickled, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {directory!r}"
    )
