"""Presets of every family by name, and building the right model class for a config."""

from typing import Any

import torch.nn as nn

from .config import PRESETS as GPT_PRESETS
from .config import GPTConfig
from .gpt import GPT
from .llama import Llama
from .llama_config import LLAMA_PRESETS, LlamaConfig

ModelConfig = GPTConfig | LlamaConfig

# Every preset name -> its family's config class ("tiny" and "gpt2*" are GPT-2; the rest Llama-style).
ALL_PRESETS: dict[str, type[GPTConfig] | type[LlamaConfig]] = {
    **{name: GPTConfig for name in GPT_PRESETS}, **{name: LlamaConfig for name in LLAMA_PRESETS}}

# config class -> model class, and the family name stored with checkpoints.
FAMILIES: dict[str, tuple[type[GPTConfig] | type[LlamaConfig], type[nn.Module]]] = {
    "gpt2": (GPTConfig, GPT), "llama": (LlamaConfig, Llama)}


def config_from_preset(name: str, **overrides: Any) -> ModelConfig:
    """The config of preset ``name`` (any family) with fields overridden by keyword."""
    if name not in ALL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(ALL_PRESETS)}")
    return ALL_PRESETS[name].from_preset(name, **overrides)


def family_of(config: ModelConfig) -> str:
    """"gpt2" or "llama": the family a config belongs to."""
    for family, (config_cls, _) in FAMILIES.items():
        if isinstance(config, config_cls):
            return family
    raise TypeError(f"expected a GPTConfig or LlamaConfig; got {type(config).__name__}")


def config_from_dict(family: str, fields: dict[str, Any]) -> ModelConfig:
    """Inverse of ``config.to_dict()`` for the named family (as stored with checkpoints)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family][0].from_dict(fields)


def build_model(config: ModelConfig) -> nn.Module:
    """A randomly initialised model of config's family."""
    return FAMILIES[family_of(config)][1](config)


def from_preset(name: str, **overrides: Any) -> nn.Module:
    """A randomly initialised model of preset ``name`` (e.g. "tiny", "gpt2", "llama-tiny",
    "qwen2.5-0.5b"), with config fields overridden by keyword. Nothing is downloaded."""
    return build_model(config_from_preset(name, **overrides))
