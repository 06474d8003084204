"""LoRA on any nn.Module, in place (FSDP2's ``fully_shard`` style): ``get_peft_model`` replaces the
targeted nn.Linear layers by ``LoraLinear``, freezes everything else and swaps the model's class
for a subclass that adds PEFT's methods (``save_adapter``, ``merge_and_unload``, ``set_adapter``,
...). ``model(idx, targets)`` and the model's own methods keep working unchanged.

Adapter files are PEFT's: ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (no adapter name), so an adapter trained on a
model imported with ``parallax.models.from_hf`` loads with ``peft.PeftModel.from_pretrained``
on the Hugging Face model, and back.
"""

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LoraConfig
from .lora import LoraLinear, find_targets, lora_layers, replace_module
from ._zero import is_writer as _is_writer
from ._zero import zero_stage as _zero_stage
from .prefix import PrefixTuningConfig, add_prefix_tuning, load_prefix_adapter, save_prefix_adapter

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel).model (the HF model)


class _TrainableCount:
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), each tensor counted once."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: trainable params, all params and the trainable share (PEFT's
        method of the same name prints it: this is its output, not logging)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")


class PrefixModelMixin(_TrainableCount):
    """The methods ``get_peft_model`` adds to a prefix-tuned model: ``save_adapter`` (PEFT's
    format); ``prefix_config`` holds the resolved config."""

    def save_adapter(self, save_directory: "str | os.PathLike", adapter_name: str | None = None,
                     base_model_name_or_path: str | None = None) -> None:
        """Write the prefix adapter to save_directory (adapter_config.json + adapter_model.safetensors),
        atomically, recording ``base_model_name_or_path`` when given. Under px.zero.shard every
        rank calls it and rank 0 writes."""
        if base_model_name_or_path is not None:
            self.prefix_config = dataclasses.replace(self.prefix_config, base_model_name_or_path=base_model_name_or_path)
        save_prefix_adapter(self, save_directory)

    def merge_and_unload(self) -> nn.Module:
        raise ValueError("prefix tuning has no weights to merge into the base model: save the adapter "
                         "(save_adapter) and load it on the base (px.peft.load_adapter)")


class PeftModelMixin(_TrainableCount):
    """The methods ``get_peft_model`` adds to a model (PEFT's names). State: ``peft_config``
    (adapter name -> LoraConfig) and ``active_adapter`` (a name, or a list of names)."""

    peft_config: dict[str, LoraConfig]
    active_adapter: str | list[str]

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add another adapter, inactive and frozen (activate it with ``set_adapter``)."""
        _check_new_adapter(self, adapter_name, peft_config)
        _inject(self, adapter_name, peft_config, find_targets(self, peft_config))
        self.set_adapter(self.active_adapter)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters the active ones (summed when several) and the only trainable ones."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"set_adapter: adapter_name must be among {sorted(self.peft_config)}; got {adapter_name!r}")
        for _, layer in lora_layers(self):
            layer.active_adapters = [n for n in names if n in layer.lora_A]
            for n in layer.lora_A:
                layer.lora_A[n].requires_grad_(n in names)
                layer.lora_B[n].requires_grad_(n in names)
        self.active_adapter = adapter_name

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the context the model computes as its base (merged adapters are unmerged)."""
        layers = [layer for _, layer in lora_layers(self)]
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disable_adapters = False

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Add the adapters (default: the active ones) into the base weights; forward then costs
        what the base costs. Undo with ``unmerge``."""
        _refuse_sharded_weights(self, "merge")
        for _, layer in lora_layers(self):
            layer.merge(adapter_names if adapter_names is not None else layer.active_adapters)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weights."""
        _refuse_sharded_weights(self, "unmerge")
        for _, layer in lora_layers(self):
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters, put the base nn.Linear layers back and return the model as
        an instance of its original class (the same object), without adapters. A quantized base
        (QLoRA) stays quantized: the merged weight is re-quantized by round-to-nearest (see
        ``parallax.peft.lora``); ``px.compress.dequantize(model)`` first gives an exact dense merge."""
        self.merge()
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; the base layers keep their current weights."""
        for name, layer in list(lora_layers(self)):
            replace_module(self, name, layer.base_layer)
        self.__class__ = self._px_base_class
        del self.peft_config, self.active_adapter
        return self

    def save_adapter(self, save_directory: "str | os.PathLike", adapter_name: str | None = None,
                     base_model_name_or_path: str | None = None) -> None:
        """Write adapter ``adapter_name`` (default: the active one) to save_directory in PEFT's
        format, recording ``base_model_name_or_path`` (default: a transformers model's own). A new
        directory appears whole or not at all; in an existing one each file is replaced
        atomically. Under px.zero.shard every rank calls it and rank 0 writes."""
        name = adapter_name if adapter_name is not None else self.active_adapter
        if not isinstance(name, str) or name not in self.peft_config:
            raise ValueError(f"save_adapter: adapter_name must be one of {sorted(self.peft_config)}; got {name!r}")
        config = self.peft_config[name]
        tensors = adapter_state_dict(self, name)
        targets = sorted({key[len(PEFT_PREFIX):].rsplit(".", 2)[0] for key in tensors})
        fields = config.to_peft_dict(targets, base_model_name_or_path or _base_name(self),
                                     fan_in_fan_out=_exports_conv1d(self))
        if _is_writer(self):
            _write_atomically(Path(save_directory), fields, tensors)
        log.info("peft: saved adapter %r (%d tensors) to %s", name, len(tensors), save_directory)


def get_peft_model(model: nn.Module, peft_config: LoraConfig | PrefixTuningConfig,
                   adapter_name: str = "default") -> nn.Module:
    """Add LoRA (or prefix-tuning) adapter ``adapter_name`` to model in place and return it.

    With a PrefixTuningConfig the model (a parallax model family) gets P trainable virtual keys
    and values per layer (``parallax.peft.prefix``) and the methods of ``PrefixModelMixin``.

    Each nn.Linear that peft_config.target_modules selects becomes a LoraLinear; every other
    parameter is frozen. The returned object is model, now also an instance of a subclass that
    adds save_adapter, merge, unmerge, merge_and_unload, set_adapter, add_adapter,
    disable_adapter and print_trainable_parameters. Raises ValueError for a target that matches
    nothing (the model is then unchanged) or a model that already has adapters (use add_adapter).
    """
    if isinstance(peft_config, PrefixTuningConfig):
        add_prefix_tuning(model, peft_config, adapter_name)
        model.__class__ = _peft_class(type(model), PrefixModelMixin)
        return model
    if not isinstance(peft_config, LoraConfig):
        raise TypeError("get_peft_model: peft_config must be a px.peft.LoraConfig or PrefixTuningConfig; "
                        f"got {type(peft_config).__name__}")
    if isinstance(model, PeftModelMixin):
        raise ValueError("get_peft_model: the model already has LoRA adapters; use model.add_adapter(name, config)")
    targets = find_targets(model, peft_config)
    model.requires_grad_(False)
    model.__class__ = _peft_class(type(model), PeftModelMixin)
    model.peft_config = {}
    model.active_adapter = adapter_name
    _inject(model, adapter_name, peft_config, targets)
    model.set_adapter(adapter_name)
    return model


def adapter_config_to_dict(config: LoraConfig | PrefixTuningConfig) -> dict:
    """A JSON-able form of an adapter config that ``adapter_config_from_dict`` reads back exactly
    (fine-tuning checkpoints record it to rebuild the adapter layers before loading)."""
    if isinstance(config, PrefixTuningConfig):
        return config.to_dict()
    return {"peft_type": "LORA", **dataclasses.asdict(config)}


def adapter_config_from_dict(fields: dict) -> LoraConfig | PrefixTuningConfig:
    """The config ``adapter_config_to_dict`` wrote."""
    if fields.get("peft_type") == "PREFIX_TUNING":
        return PrefixTuningConfig.from_dict(fields)
    return LoraConfig(**{k: v for k, v in fields.items() if k != "peft_type"})


def adapter_state_dict(model: PeftModelMixin, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's keys -> full CPU tensors of one adapter, as save_pretrained writes them. Under
    px.zero.shard every rank must call it (the shards are gathered)."""
    peft_keys = {f"{path}.{part}.{adapter_name}.weight": f"{PEFT_PREFIX}{path}.{part}.weight"
                 for path, layer in lora_layers(model) if adapter_name in layer.lora_A for part in ("lora_A", "lora_B")}
    if _zero_stage(model) is None:
        values = {name: p.detach().cpu() for name, p in model.named_parameters() if name in peft_keys}
    else:
        from parallax.zero import (
            full_state_dict,  # lazy: zero imports torch.distributed machinery
        )

        values = full_state_dict(model)
    return {peft_key: values[name].contiguous() for name, peft_key in peft_keys.items()}


def load_adapter(model: nn.Module, adapter_dir: "str | os.PathLike", adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Load a PEFT-format LoRA adapter directory into model (in place) and return it.

    On a model without adapters the LoRA layers are created from adapter_config.json and the new
    adapter is active; on one that has adapters it is added inactive (as PEFT's load_adapter).
    The adapter is frozen unless is_trainable. Everything is checked before the model changes:
    ValueError naming the module and both shapes for an adapter saved for another base, or a key
    that matches no LoRA layer, or a layer without its tensors.
    """
    directory = Path(adapter_dir)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"load_adapter: {path} does not exist (a PEFT adapter directory holds "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    fields = json.loads(config_path.read_text())
    if isinstance(fields, dict) and fields.get("peft_type") == "PREFIX_TUNING":
        load_prefix_adapter(model, directory, adapter_name).prompt_encoder.requires_grad_(is_trainable)
        model.__class__ = _peft_class(type(model), PrefixModelMixin)
        return model
    config = LoraConfig.from_peft_dict(fields, where=str(config_path))
    if isinstance(model, PeftModelMixin):
        _check_new_adapter(model, adapter_name, config)
    targets = find_targets(model, config)
    tensors = _checked_tensors(model, targets, config, load_file(weights_path), str(weights_path))
    if isinstance(model, PeftModelMixin):
        model.add_adapter(adapter_name, config)
    else:
        get_peft_model(model, config, adapter_name)
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if adapter_name in layer.lora_A:
                layer.lora_A[adapter_name].weight.copy_(tensors[f"{path}.lora_A.weight"])
                layer.lora_B[adapter_name].weight.copy_(tensors[f"{path}.lora_B.weight"])
    if is_trainable and adapter_name in model.active_adapters:
        model.set_adapter(model.active_adapter)
    else:
        for _, layer in lora_layers(model):
            if adapter_name in layer.lora_A:
                layer.lora_A[adapter_name].requires_grad_(is_trainable)
                layer.lora_B[adapter_name].requires_grad_(is_trainable)
    return model


def _checked_tensors(model: nn.Module, targets: list[str], config: LoraConfig, stored: dict[str, torch.Tensor],
                     where: str) -> dict[str, torch.Tensor]:
    """The file's tensors keyed by ``<path>.lora_A.weight``, after checking they are exactly the
    ones config creates in model, with the shapes model needs."""
    expected = {}
    for path in targets:
        module = model.get_submodule(path)
        in_features, out_features = module.in_features, module.out_features
        expected[f"{path}.lora_A.weight"] = (config.r, in_features)
        expected[f"{path}.lora_B.weight"] = (out_features, config.r)
    tensors = {key.removeprefix(PEFT_PREFIX): t for key, t in stored.items()}
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(f"{where}: keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''} match no LoRA layer that "
                         f"the adapter's target_modules select in {type(model).__name__}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{where}: no tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}, which the "
                         "adapter's target_modules select")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            module, _, part = key.rpartition(".")[0].rpartition(".")
            raise ValueError(f"{where}: adapter saved for another base model: {module} {part} has shape "
                             f"{tuple(tensors[key].shape)} in the file but this model needs {shape}")
    return tensors


def _refuse_sharded_weights(model: nn.Module, what: str) -> None:
    if _zero_stage(model) == 3:
        raise ValueError(f"{what}: the base weights are sharded by ZeRO-3; save the adapter with save_adapter and "
                         "merge it into an unsharded model (px.peft.load_adapter, then merge_and_unload)")


def _inject(model: nn.Module, adapter_name: str, config: LoraConfig, targets: list[str]) -> None:
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            replace_module(model, name, module)
        module.update_layer(adapter_name, config)
    model.peft_config[adapter_name] = config


def _check_new_adapter(model: PeftModelMixin, adapter_name: str, config: LoraConfig) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without dots; got {adapter_name!r}")
    if adapter_name in model.peft_config:
        raise ValueError(f"adapter_name {adapter_name!r} already exists; the model has {sorted(model.peft_config)}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"peft_config must be a px.peft.LoraConfig; got {type(config).__name__}")


_PEFT_CLASSES: dict[tuple[type, type], type] = {}


def _peft_class(cls: type, mixin: type) -> type:
    """The subclass of cls with the mixin's methods, one per (class, mixin) (as zero.shard does)."""
    if (cls, mixin) not in _PEFT_CLASSES:
        name = "Peft" if mixin is PeftModelMixin else "PrefixTuned"
        _PEFT_CLASSES[cls, mixin] = type(f"{name}{cls.__name__}", (mixin, cls), {"_px_base_class": cls})
    return _PEFT_CLASSES[cls, mixin]


def _base_name(model: nn.Module) -> str | None:
    """The base model's name or path for adapter_config.json, where the model knows it (transformers)."""
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def _exports_conv1d(model: nn.Module) -> bool:
    """Whether the model's Hugging Face counterpart uses Conv1D (GPT-2): PEFT then records
    fan_in_fan_out=True. The LoRA tensors are the same either way (A (r, in), B (out, r))."""
    from parallax.models import GPT  # lazy: models import the ops

    return isinstance(model, GPT)


def _write_atomically(directory: Path, fields: dict, tensors: dict[str, torch.Tensor]) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        (staging / CONFIG_NAME).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        if not directory.exists():
            os.replace(staging, directory)
            return
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
