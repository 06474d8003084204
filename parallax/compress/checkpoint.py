"""A compressed model on disk: ``px.compress.save(model, dir)`` / ``px.compress.load(dir)``.

The directory holds ``config.json`` with one key, ``parallax_compressed``: the model family and
config (after any change of shape, e.g. structured pruning), the spec of every compressed module
by qualified name (``QuantLinear``, ``LowRankLinear``, ...; see ``common.register_module``), the
aliases of tensors stored once (tied embeddings, shared layers), the tokenizer reference and the
steps that made it; and ``model.safetensors`` (sharded above 4 GiB) with every tensor in its
stored dtype (int4 stays packed). Written atomically as a Hugging Face export is
(``models.hf_write``): a complete new directory is renamed into place, an old one replaced only
then. ``load_trained`` (``--checkpoint DIR`` of ``parallax generate|eval``) and ``parallax
compress`` itself read it, so methods stack (prune, then quantize).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallax.compress.common import module_kinds, set_module

__all__ = ["save", "load", "is_compressed", "read_manifest", "CONFIG_KEY"]

CONFIG_KEY = "parallax_compressed"
_VERSION = 1
_MAX_SHARD_BYTES = 4 << 30


def is_compressed(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a model written by ``px.compress.save``."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return False
    try:
        return CONFIG_KEY in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``parallax_compressed`` entry of ``directory/config.json``; ValueError when it has none."""
    if not is_compressed(directory):
        raise ValueError(f"{directory}: not a compressed model directory (no config.json with {CONFIG_KEY!r}; "
                         "px.compress.save / parallax compress write one)")
    return json.loads((Path(directory) / "config.json").read_text())[CONFIG_KEY]


def save(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None,
         steps: list[dict[str, Any]] | None = None) -> Path:
    """Write ``model`` (a parallax model family, compressed or not) to ``directory`` atomically.
    ``tokenizer``: the model's tokenizer (recorded by reference, as training checkpoints do);
    ``steps``: what was applied, e.g. ``[{"method": "quantize", "bits": 4, ...}]``, kept for reports."""
    from parallax.data.tokenizer import tokenizer_reference
    from parallax.models import family_of
    from parallax.models.hf_write import write_hf_directory

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model: px.compress.save needs a parallax model family (GPT, Llama, ...) with a .config")
    kinds = module_kinds()
    modules = {fqn: {"kind": type(m).__name__, **m.spec()} for fqn, m in model.named_modules()
               if type(m).__name__ in kinds}
    tensors, aliases = _unique_tensors(model.state_dict())
    manifest = {"version": _VERSION, "family": family_of(config), "config": config.to_dict(), "modules": modules,
                "aliases": aliases, "steps": list(steps or []),
                "tokenizer": None if tokenizer is None else tokenizer_reference(tokenizer)}
    return write_hf_directory(directory, {CONFIG_KEY: manifest}, tensors, lambda _name, t: t, _MAX_SHARD_BYTES)


def load(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """The model ``save`` wrote to ``directory``, on ``device``, in eval mode."""
    from parallax.models import build_model, config_from_dict
    from parallax.models.hf_read import open_directory

    manifest = read_manifest(directory)
    if manifest.get("version") != _VERSION:
        raise ValueError(f"{directory}: compressed format version {manifest.get('version')!r}; this parallax "
                         f"reads version {_VERSION}")
    with torch.device("meta"):
        model = build_model(config_from_dict(manifest["family"], manifest["config"]))
        kinds = module_kinds()
        for fqn, spec in manifest["modules"].items():
            spec = dict(spec)
            kind = spec.pop("kind")
            if kind not in kinds:
                raise ValueError(f"{directory}: module {fqn} is a {kind}, which this parallax does not know "
                                 f"(known: {', '.join(sorted(kinds))})")
            set_module(model, fqn, kinds[kind].from_spec(spec))
    source = open_directory(str(directory))
    tensors: dict[str, torch.Tensor] = {}
    # own, aligned copies: safetensors hands out views at the file's (unaligned) offsets, which
    # vectorised CPU kernels cannot read (ATen's int8 matmul crashes on them)
    source.read(list(source.index), lambda name, t: tensors.__setitem__(name, t.clone()))
    for alias, name in manifest["aliases"].items():
        tensors[alias] = tensors[name]
    model.load_state_dict(tensors, assign=True)
    _retie(model, manifest["aliases"])
    return model.to(device).eval()


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors stored once, {alias: stored name}): entries that are views of the same storage with
    the same shape (tied embeddings, shared layers) are kept under their first name."""
    stored: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in stored:
            aliases[name] = stored[key]
        else:
            stored[key] = name
            tensors[name] = t
    return tensors, aliases


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """``load_state_dict(assign=True)`` gives each alias its own Parameter object: point the alias's
    module attribute back at the stored one, so tied/shared weights stay one parameter."""
    for alias, name in aliases.items():
        owner_name, _, attr = alias.rpartition(".")
        source_name, _, source_attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        source = model.get_submodule(source_name) if source_name else model
        setattr(owner, attr, getattr(source, source_attr))
