"""Prefix tuning with Hugging Face PEFT's semantics and adapter files.

Every attention layer gets P trainable virtual keys and values that all queries see ahead of the
real tokens; the real tokens take positions P, P + 1, ... (PEFT passes the prefix as
``past_key_values``, so transformers places the input after it). The virtual K/V of all layers
come from one ``PrefixEncoder``: an embedding of P rows of ``num_layers * 2 * token_dim`` values
(``token_dim = Hkv * D``: PEFT sizes the prefix by the key/value heads under grouped-query
attention), or with ``prefix_projection`` a P x token_dim embedding fed through PEFT's
Linear-Tanh-Linear reparameterisation. A row is laid out as (2 * num_layers, Hkv, D): layer l's
keys at index 2l, its values at 2l + 1.

    cfg = PrefixTuningConfig(num_virtual_tokens=20)
    add_prefix_tuning(model, cfg)             # base frozen; only model.prompt_encoder trains
    save_prefix_adapter(model, "adapter")     # adapter_config.json + adapter_model.safetensors
    load_prefix_adapter(other_model, "adapter")  # also a directory PEFT wrote

Files: PEFT saves the virtual K/V table itself (key ``prompt_embeddings``, shape
(P, num_layers * 2 * token_dim)), also when it was trained through the projection; a loaded
adapter is that table (PEFT's ``inference_mode``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from parallax.models.attention import attention_layers
from parallax.peft._zero import is_writer, zero_stage

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "add_prefix_tuning", "prefix_adapter_state_dict",
           "save_prefix_adapter", "load_prefix_adapter", "read_prefix_adapter", "prefix_encoder"]

log = logging.getLogger(__name__)

PEFT_TYPE = "PREFIX_TUNING"
TASK_TYPE = "CAUSAL_LM"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
EMBEDDING_KEY = "prompt_embeddings"
INIT_WEIGHTS = (None, "zero")
# PEFT's PromptLearningConfig fields parallax has no use for (read from files, written back as PEFT does).
_PEFT_ONLY_FIELDS = {"auto_mapping": None, "revision": None, "modules_to_save": None}


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


@dataclass(kw_only=True)
class PrefixTuningConfig:
    """PEFT's ``PrefixTuningConfig`` for causal language models.

    num_virtual_tokens: P, the virtual tokens per layer. prefix_projection: reparameterise the
        prefix through Linear(token_dim, encoder_hidden_size)-Tanh-Linear(encoder_hidden_size,
        num_layers * 2 * token_dim). encoder_hidden_size: that MLP's width (default token_dim).
    init_weights: None (PEFT's random init) or "zero" (the prefix starts as all-zero K/V).
    inference_mode: the encoder is the K/V table alone (what adapter files hold).
    num_layers, token_dim (= KV heads * head size), num_attention_heads (= KV heads): filled in
        from the model by ``add_prefix_tuning``; when given they must match it.
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None
    inference_mode: bool = False
    num_layers: int | None = None
    token_dim: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int = 1
    base_model_name_or_path: str | None = None
    task_type: str = TASK_TYPE
    peft_type: str = PEFT_TYPE

    def __post_init__(self) -> None:
        _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("encoder_hidden_size", "num_layers", "token_dim", "num_attention_heads"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("prefix_projection", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"init_weights must be one of {INIT_WEIGHTS}; got {self.init_weights!r}")
        if self.num_transformer_submodules != 1:
            raise ValueError("num_transformer_submodules must be 1 (decoder-only causal LMs); "
                             f"got {self.num_transformer_submodules!r}")
        if self.task_type != TASK_TYPE:
            raise ValueError(f"task_type must be {TASK_TYPE!r}; got {self.task_type!r}")
        if self.peft_type != PEFT_TYPE:
            raise ValueError(f"peft_type must be {PEFT_TYPE!r}; got {self.peft_type!r}")
        if self.token_dim is not None and self.num_attention_heads is not None \
                and self.token_dim % self.num_attention_heads:
            raise ValueError(f"token_dim={self.token_dim} must be a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")

    def for_model(self, model: nn.Module) -> PrefixTuningConfig:
        """This config with num_layers, token_dim, num_attention_heads and encoder_hidden_size
        filled in from ``model``; ValueError naming the field if a given one does not match."""
        layers = attention_layers(model, "prefix tuning")
        shape = {"num_layers": len(layers), "token_dim": layers[0].n_kv_head * layers[0].head_dim,
                 "num_attention_heads": layers[0].n_kv_head}
        for name, expected in shape.items():
            given = getattr(self, name)
            if given is not None and given != expected:
                raise ValueError(f"{name}={given} does not match the model ({type(model).__name__} has "
                                 f"{name}={expected})")
        hidden = self.encoder_hidden_size or shape["token_dim"]
        return replace(self, encoder_hidden_size=hidden, **shape)

    def to_dict(self) -> dict[str, Any]:
        """PEFT's adapter_config.json fields."""
        return {**_PEFT_ONLY_FIELDS, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> PrefixTuningConfig:
        """A config from PEFT's adapter_config.json fields (PEFT's own bookkeeping is ignored)."""
        if data.get("peft_type") != PEFT_TYPE:
            raise ValueError(f"{source} has peft_type {data.get('peft_type')!r}; expected {PEFT_TYPE!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - set(_PEFT_ONLY_FIELDS) - {"peft_version"})
        if unknown:
            log.warning("%s: ignoring fields parallax does not use: %s", source, unknown)
        return cls(**{k: v for k, v in data.items() if k in known})


class PrefixEncoder(nn.Module):
    """The virtual keys and values of every layer (PEFT's ``PrefixEncoder``, same parameter names).

    ``forward(layer)`` -> (keys, values), each (P, Hkv, D). With the projection, only the output
    columns of that layer are computed, so a forward through L layers costs one table, not L.
    """

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        if config.num_layers is None or config.token_dim is None or config.num_attention_heads is None:
            raise ValueError("PrefixEncoder needs a config with num_layers, token_dim and num_attention_heads "
                             "(PrefixTuningConfig.for_model fills them in)")
        self.num_virtual_tokens = config.num_virtual_tokens
        self.num_layers = config.num_layers
        self.token_dim = config.token_dim
        self.n_kv_head = config.num_attention_heads
        self.head_dim = config.token_dim // config.num_attention_heads
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        table_width = config.num_layers * 2 * config.token_dim
        if self.prefix_projection:
            hidden = config.encoder_hidden_size or config.token_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden), nn.Tanh(),
                                           nn.Linear(hidden, table_width))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, table_width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s virtual keys and values, each (P, Hkv, D)."""
        width = 2 * self.token_dim
        cols = slice(layer * width, (layer + 1) * width)
        if self.prefix_projection:
            out = self.transform[-1]
            hidden = self.transform[1](self.transform[0](self.embedding.weight))  # (P, hidden)
            kv = F.linear(hidden, out.weight[cols], out.bias[cols])  # (P, 2 * token_dim)
        else:
            kv = self.embedding.weight[:, cols]
        kv = kv.reshape(self.num_virtual_tokens, 2, self.n_kv_head, self.head_dim)
        return kv[:, 0], kv[:, 1]

    def table(self) -> torch.Tensor:
        """The whole virtual K/V table (P, num_layers * 2 * token_dim): what PEFT saves."""
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight


class _LayerPrefix:
    """``Attention.prefix`` of one layer: calls the encoder (as a module, so hooks such as
    ZeRO-3's gathers run) for that layer's virtual keys and values."""

    def __init__(self, encoder: PrefixEncoder, layer: int) -> None:
        self.encoder = encoder
        self.layer = layer

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(self.layer)


def prefix_encoder(model: nn.Module) -> tuple[str, PrefixEncoder] | None:
    """(adapter name, encoder) of the model's prefix-tuning adapter, or None."""
    encoders = getattr(model, "prompt_encoder", None)
    if not isinstance(encoders, nn.ModuleDict) or not encoders:
        return None
    name = next(iter(encoders))
    return name, encoders[name]


def add_prefix_tuning(model: nn.Module, config: PrefixTuningConfig, adapter_name: str = "default") -> nn.Module:
    """Add a prefix-tuning adapter to a parallax model in place and freeze everything else.

    The encoder lives at ``model.prompt_encoder[adapter_name]`` (PEFT's parameter names), the
    model's ``position_offset`` becomes P, and every ``Attention`` layer's ``prefix`` reads its
    slice of the encoder. Returns the model. The resolved config is ``model.prefix_config``.
    """
    if not isinstance(config, PrefixTuningConfig):
        raise ValueError(f"config must be a PrefixTuningConfig; got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without dots; got {adapter_name!r}")
    if prefix_encoder(model) is not None:
        raise ValueError(f"{type(model).__name__} already has a prefix-tuning adapter "
                         f"({prefix_encoder(model)[0]!r}); parallax serves one at a time")
    if not hasattr(model, "position_offset"):
        raise ValueError(f"{type(model).__name__} has no position_offset; prefix tuning needs a parallax model "
                         "family (GPT or the Llama family)")
    config = config.for_model(model)
    layers = attention_layers(model, "prefix tuning")
    param = next(model.parameters())
    encoder = PrefixEncoder(config).to(device=param.device, dtype=param.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    model.prompt_encoder = nn.ModuleDict({adapter_name: encoder})
    model.prefix_config = config
    model.position_offset = config.num_virtual_tokens
    for i, layer in enumerate(layers):
        layer.prefix = _LayerPrefix(encoder, i)
    return model


def _require_prefix(model: nn.Module) -> tuple[str, PrefixEncoder]:
    found = prefix_encoder(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no prefix-tuning adapter (add_prefix_tuning adds one)")
    return found


def prefix_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's adapter state dict: {"prompt_embeddings": (P, num_layers * 2 * token_dim)}, on CPU.
    Under px.zero.shard every rank must call it (stage 3 gathers the encoder's shards)."""
    name, encoder = _require_prefix(model)
    if zero_stage(model) is not None:
        from parallax.zero import full_state_dict  # lazy: zero imports torch.distributed machinery

        key = f"prompt_encoder.{name}."
        encoder = PrefixEncoder(model.prefix_config)
        encoder.load_state_dict({k[len(key):]: v for k, v in full_state_dict(model).items() if k.startswith(key)})
    with torch.no_grad():
        return {EMBEDDING_KEY: encoder.table().detach().to("cpu").contiguous()}


def save_prefix_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's format) into ``directory``,
    atomically: both files appear together or, on failure, the directory is left as it was. Under
    px.zero.shard every rank calls it and rank 0 writes."""
    _require_prefix(model)
    directory = Path(directory)
    config = replace(model.prefix_config, inference_mode=True)
    tensors = prefix_adapter_state_dict(model)
    if not is_writer(model):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        _swap_in(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _swap_in(staging: Path, directory: Path) -> None:
    """Rename ``staging`` to ``directory``, replacing what was there only once the new one is in place."""
    if not directory.exists():
        staging.rename(directory)
        return
    if not directory.is_dir():
        raise ValueError(f"adapter directory {directory} exists and is not a directory")
    old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    old.rmdir()
    directory.rename(old)
    try:
        staging.rename(directory)
    except BaseException:
        old.rename(directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_prefix_adapter(directory: str | os.PathLike) -> tuple[PrefixTuningConfig, torch.Tensor]:
    """The config and K/V table (P, num_layers * 2 * token_dim) of a PEFT prefix adapter directory."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{directory} is not a PEFT adapter directory: {path.name} is missing")
    config = PrefixTuningConfig.from_dict(json.loads(config_path.read_text()), source=str(config_path))
    tensors = load_file(weights_path)
    if set(tensors) != {EMBEDDING_KEY}:
        raise ValueError(f"{weights_path} holds {sorted(tensors)}; a prefix adapter holds only {EMBEDDING_KEY!r}")
    return config, tensors[EMBEDDING_KEY]


def load_prefix_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Add the prefix adapter saved in ``directory`` (by parallax or PEFT) to ``model`` in place.

    Everything is checked before the model changes: an adapter saved for another base raises a
    ValueError naming the table shape in the file and the shape this model needs.
    """
    config, table = read_prefix_adapter(directory)
    layers = attention_layers(model, "prefix tuning")
    expected = (config.num_virtual_tokens, len(layers) * 2 * layers[0].n_kv_head * layers[0].head_dim)
    if tuple(table.shape) != expected:
        raise ValueError(f"the adapter in {directory} was saved for another base model: its {EMBEDDING_KEY} has "
                         f"shape {tuple(table.shape)}, but {type(model).__name__} ({len(layers)} layers, "
                         f"{layers[0].n_kv_head} KV heads of size {layers[0].head_dim}) needs {expected}")
    config = replace(config, inference_mode=True).for_model(model)
    add_prefix_tuning(model, config, adapter_name)
    _, encoder = _require_prefix(model)
    with torch.no_grad():
        encoder.embedding.weight.copy_(table)
    return model
