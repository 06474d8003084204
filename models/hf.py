"""Hugging Face import and export for every family: ``from_hf`` and ``to_hf``.

``from_hf`` reads a ``save_pretrained`` directory (config.json plus model.safetensors, sharded
safetensors with model.safetensors.index.json, or pytorch_model.bin) or takes a transformers model
object, duck-typed: transformers is never imported. It dispatches on config.json's ``model_type``
(or ``architectures``) to GPT (gpt2) or Llama (llama, mistral, qwen2, qwen3), builds the model on
the meta device, allocates it in the checkpoint's dtype and copies the weights in one tensor at a
time, shard by shard, so a directory's weights are never held twice in memory. ``to_hf`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. The per-family mappings are in
``hf_gpt2`` and ``hf_llama``; the file work in ``hf_read`` and ``hf_write``.
"""

import dataclasses
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from . import hf_gpt2, hf_llama
from .hf_read import (
    WeightSource,
    load_weights,
    materialize,
    open_directory,
    open_state_dict,
    plan_load,
    unique_tensors,
)
from .hf_write import CONFIG_FILE, parse_size, write_hf_directory
from .llama_config import MODEL_TYPES

# config.json's model_type -> the module that maps that architecture.
FAMILIES: dict[str, ModuleType] = {"gpt2": hf_gpt2, **dict.fromkeys(MODEL_TYPES, hf_llama)}
ARCHITECTURES: dict[str, str] = {**hf_gpt2.ARCHITECTURES, **hf_llama.ARCHITECTURES}

DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default


def from_hf(source: "str | os.PathLike | nn.Module", **overrides: Any) -> nn.Module:
    """A parallax model (GPT or Llama) with the weights of a Hugging Face model.

    source: a directory written by ``save_pretrained`` (transformers is not needed) or a
    transformers GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or
    Qwen3ForCausalLM object (or their base ``*Model``). overrides replace fields of the config
    derived from the HF one, e.g. ``attention="math"`` or ``dropout=0.0``. The model is on the
    CPU, in the dtype of the source's embedding, and owns its weights. Raises ValueError naming the
    field of an HF config parallax cannot compute as transformers does, or every missing,
    unexpected or wrongly shaped tensor and its file.
    """
    return load_hf(source, overrides)


def load_hf(source: "str | os.PathLike | nn.Module", overrides: dict[str, Any],
            model_class: type[nn.Module] | None = None) -> nn.Module:
    """``from_hf``, refusing a source of another model class than model_class when it is given."""
    family, config, config_where = _config(source, overrides)
    if model_class is not None and family.MODEL_CLASS is not model_class:
        raise ValueError(f"{config_where} describes a {getattr(config, 'model_type', 'gpt2')!r} model, not a "
                         f"{model_class.__name__}; use parallax.models.from_hf")
    weights = _open_weights(source)
    with torch.device("meta"):
        model = family.MODEL_CLASS(config)
    plan = plan_load(model, weights, lambda name: family.import_name(name, config),
                     lambda name: family.export_name(name, config), family.transposed,
                     what=f"the {config.__class__.__name__} of {config_where}")
    materialize(model, weights.index[plan[family.EMBEDDING]].dtype)
    load_weights(model, weights, plan, family.transposed)
    return model


def read_hf_config(source: "str | os.PathLike | nn.Module", **overrides: Any) -> Any:
    """The parallax config (GPTConfig or LlamaConfig) ``from_hf`` would build for source, without
    reading any weights; the same errors for fields parallax cannot compute."""
    return _config(source, overrides)[1]


def _config(source: "str | os.PathLike | nn.Module", overrides: dict[str, Any]) -> tuple[ModuleType, Any, str]:
    """(family module, parallax config, what to name in messages) of an HF source."""
    hf_config, config_where = _read_config(source)
    model_type = hf_model_type(hf_config, config_where)
    family = FAMILIES[model_type]
    try:
        return family, family.config_from_hf({**hf_config, "model_type": model_type}, **overrides), config_where
    except ValueError as e:
        raise ValueError(f"{config_where}: {e}") from e


def hf_model_type(hf_config: dict[str, Any], where: str) -> str:
    """The supported model_type of an HF config (from ``architectures`` when it has none), or a
    ValueError naming ``where`` and the field that makes it unsupported."""
    architectures = hf_config.get("architectures") or []
    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if unknown:
        raise ValueError(f"{where}: HF architectures {unknown} are not supported; parallax imports "
                         f"{sorted(ARCHITECTURES)}")
    model_type = hf_config.get("model_type") or (ARCHITECTURES[architectures[0]] if architectures else None)
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: HF model_type {model_type!r} is not supported; parallax imports "
                         f"{sorted(FAMILIES)}")
    if hf_config.get("quantization_config"):
        raise ValueError(f"{where}: HF quantization_config is set; parallax imports unquantized weights only")
    custom = {"AutoModel", "AutoModelForCausalLM"} & set(hf_config.get("auto_map") or {})
    if custom:
        raise ValueError(f"{where}: HF auto_map names custom modeling code for {sorted(custom)}; parallax "
                         "computes the built-in architecture only")
    return model_type


def _read_config(source: "str | os.PathLike | nn.Module") -> tuple[dict[str, Any], str]:
    """(HF config dict, what to name in messages about it) of a directory or a transformers model."""
    if isinstance(source, (str, os.PathLike)):
        config_file = os.path.join(os.fspath(source), CONFIG_FILE)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no {CONFIG_FILE} in {os.fspath(source)!r}: from_hf reads a save_pretrained "
                                    "directory")
        with open(config_file) as f:
            try:
                return json.load(f), config_file
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    if not (hasattr(source, "state_dict") and hasattr(getattr(source, "config", None), "to_dict")):
        raise TypeError(f"from_hf expects a directory or a transformers model (with .config and .state_dict()); "
                        f"got {type(source).__name__}")
    return source.config.to_dict(), f"the config of the {type(source).__name__} object"


def _open_weights(source: "str | os.PathLike | nn.Module") -> WeightSource:
    if isinstance(source, (str, os.PathLike)):
        return open_directory(os.fspath(source))
    return open_state_dict(source.state_dict(), f"the {type(source).__name__} object")


def to_hf(model: nn.Module, directory: str | os.PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
          ) -> Path:
    """Write model (a parallax GPT or Llama) as a Hugging Face directory that
    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads: config.json, and
    model.safetensors or, beyond max_shard_size (bytes, or a string such as "5GB"), shards plus
    model.safetensors.index.json; tied weights are stored once. Written atomically (see
    ``hf_write``); other files of an existing model directory (tokenizer...) are kept.
    ValueError naming a config field the model's HF architecture cannot express. Returns the path.
    """
    family = _family_of(model)
    max_bytes = parse_size(max_shard_size)
    hf_config = family.config_to_hf(model.config)
    ours = _checked_tensors(model, family)
    tensors = {family.export_name(name, model.config): t for name, t in ours.items()}
    transpose = {family.export_name(name, model.config) for name in ours if family.transposed(name)}
    hf_config["dtype"] = str(ours[family.EMBEDDING].dtype).removeprefix("torch.")
    return write_hf_directory(directory, hf_config, tensors, lambda name, t: t.t() if name in transpose else t,
                              max_bytes)


def _family_of(model: nn.Module) -> ModuleType:
    for family in (hf_gpt2, hf_llama):
        if isinstance(model, family.MODEL_CLASS):
            return family
    raise TypeError(f"to_hf expects a parallax GPT or Llama model; got {type(model).__name__} "
                    "(an adapter-wrapped model must be merged first)")


def _checked_tensors(model: nn.Module, family: ModuleType) -> dict[str, torch.Tensor]:
    """The model's tensors (tied ones once; a block shared by several layers, ``share_layers``,
    under every layer's names, as Hugging Face has no sharing), or ValueError when they are not
    the full tensors its config describes (e.g. a ZeRO-sharded model: gather its full state first)."""
    with torch.device("meta"):
        unshared = family.MODEL_CLASS(dataclasses.replace(model.config, share_layers=1))
        expected = {name: tuple(t.shape) for name, t in unique_tensors(unshared).items()}
    tensors = unique_tensors(model)
    every = model.state_dict(keep_vars=True)
    # a copy for each further layer: safetensors refuses tensors that share memory
    tensors |= {name: every[name].detach().clone() for name in expected if name in every and name not in tensors}
    actual = {name: tuple(t.shape) for name, t in tensors.items()}
    differ = sorted(name for name in expected.keys() | actual.keys() if expected.get(name) != actual.get(name))
    if differ:
        details = ", ".join(f"{n}: {list(actual[n]) if n in actual else 'absent'} (config: "
                            f"{list(expected[n]) if n in expected else 'absent'})" for n in differ[:10])
        raise ValueError(f"to_hf: the model's tensors are not the full tensors of its config: {details}")
    return tensors
