"""Training checkpoints: ``OUT/checkpoints/step_NNNNNN/``, each a sharded ``px.checkpoint``.

Written atomically and durably by every rank (fsync'd temporary directory, then rename),
loadable at any world size and ZeRO stage (``--resume`` after changing ``--nproc`` or
``--zero-stage`` works), and readable without a process group by ``load_model`` (for sampling,
export, inference). A new step is saved before older ones are removed, and removal renames a
checkpoint away before deleting its files, so a process killed at any point leaves the newest
complete checkpoint for ``--resume`` and lists no partial one.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from torch import nn

from parallax import checkpoint
from parallax.data.tokenizer import ByteTokenizer, Tokenizer, tokenizer_from_reference, tokenizer_reference
from parallax.models import ModelConfig, build_model, config_from_dict, family_of
from parallax.models.config import GPTConfig
from parallax.zero import ZeroOptimizer

__all__ = ["save_checkpoint", "save_model", "latest_checkpoint", "list_checkpoints", "load_model", "load_tokenizer",
           "saved_model_config", "saved_tokenizer_reference", "GPT_CONFIG_KEY", "MODEL_CONFIG_KEY", "PEFT_CONFIG_KEY",
           "TOKENIZER_KEY"]

log = logging.getLogger(__name__)
_NAME = re.compile(rf"^step_(\d{{6,}})(?:{re.escape(checkpoint.sharded.BACKUP_SUFFIX)})?$")
# A checkpoint's own name, its backup, or a temporary/half-deleted directory of it (".step_N.tmp-...").
_ANY_ENTRY = re.compile(r"^\.?(step_\d{6,})(?:\.|$)")
GPT_CONFIG_KEY = "parallax.gpt_config"  # same metadata key as GPT.save, so consolidated files load with GPT.load
# The run's tokenizer_reference (where it was loaded from, and its identity); checkpoints written
# before it existed were trained on bytes.
TOKENIZER_KEY = "parallax.tokenizer"
MODEL_CONFIG_KEY = "parallax.model_config"  # {"family": "gpt2" | "llama", "config": config.to_dict()}
PEFT_CONFIG_KEY = "parallax.peft_config"  # a fine-tuning run's adapter: {"peft_type": "LORA" | "PREFIX_TUNING", ...}
_BYTE_REFERENCE = tokenizer_reference(ByteTokenizer())


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first.

    A step whose save was interrupted while replacing it is listed at its backup (``px.checkpoint.locate``).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    steps = {int(m.group(1)): root / child.name.removesuffix(checkpoint.sharded.BACKUP_SUFFIX)
             for child in root.iterdir() if (m := _NAME.match(child.name))}
    found = [(step, checkpoint.locate(path)) for step, path in steps.items()]
    return sorted((step, path) for step, path in found if (path / checkpoint.sharded.MANIFEST).is_file())


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str | Path, model: nn.Module, optimizer: ZeroOptimizer, *, step: int,
                    config: dict[str, Any], model_config: ModelConfig, tokenizer: dict[str, Any], keep: int,
                    is_main: bool, metadata: dict[str, str] | None = None) -> Path:
    """Every rank writes its shard of step ``step``; rank 0 then keeps only the ``keep`` newest.
    ``tokenizer`` is the run's ``tokenizer_reference``; ``metadata`` adds entries (e.g. the
    adapter config of a fine-tuning run, ``PEFT_CONFIG_KEY``)."""
    root = Path(root)
    path = root / f"step_{step:06d}"
    metadata = {**(metadata or {}),
                MODEL_CONFIG_KEY: json.dumps({"family": family_of(model_config), "config": model_config.to_dict()}),
                TOKENIZER_KEY: json.dumps(tokenizer)}
    if isinstance(model_config, GPTConfig):  # consolidated files of GPTs also load with GPT.load
        metadata[GPT_CONFIG_KEY] = json.dumps(model_config.to_dict())
    checkpoint.save(path, model, optimizer, step=step, extra={"train_config": config, "metadata": metadata})
    if is_main:
        _prune(root, keep)
        log.info("checkpoint: saved step %d to %s", step, path)
    return path


def save_model(directory: str | Path, model: nn.Module, *, step: int, model_config: ModelConfig,
               tokenizer: dict[str, Any]) -> Path:
    """A model-only checkpoint (no optimizer state) of an unsharded model, written by this one
    process (with a private process group of size 1 when none exists), loadable with ``load_model``
    and every ``--checkpoint`` flag. Atomic, as ``px.checkpoint.save``."""
    import torch.distributed as dist

    from parallax import zero

    metadata = {MODEL_CONFIG_KEY: json.dumps({"family": family_of(model_config), "config": model_config.to_dict()}),
                TOKENIZER_KEY: json.dumps(tokenizer)}
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        zero.shard(model, stage=0)
        return checkpoint.save(directory, model, step=step, extra={"metadata": metadata})
    finally:
        if own_group:
            dist.destroy_process_group()


def _prune(root: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints, and what interrupted saves and removals left."""
    kept = {path.name.removesuffix(checkpoint.sharded.BACKUP_SUFFIX) for _, path in list_checkpoints(root)[-keep:]}
    names = {m.group(1) for child in root.iterdir() if (m := _ANY_ENTRY.match(child.name))}
    for name in sorted(names - kept):
        checkpoint.remove(root / name)


def saved_model_config(manifest: dict[str, Any]) -> ModelConfig | None:
    """The model config a checkpoint's manifest records (any family; older checkpoints: a GPT's),
    or None when it records none."""
    metadata = manifest.get("extra", {}).get("metadata", {})
    if MODEL_CONFIG_KEY in metadata:
        saved = json.loads(metadata[MODEL_CONFIG_KEY])
        return config_from_dict(saved["family"], saved["config"])
    if GPT_CONFIG_KEY in metadata:
        return GPTConfig.from_dict(json.loads(metadata[GPT_CONFIG_KEY]))
    return None


def load_model(path: str | Path) -> nn.Module:
    """The model of a training checkpoint (any family), on CPU, without a process group."""
    tensors, manifest = checkpoint.full_tensors(path)
    config = saved_model_config(manifest)
    if config is None:
        raise checkpoint.CheckpointError(f"{path} holds no model config (was it written by parallax train?)")
    model = build_model(config)
    adapter = manifest.get("extra", {}).get("metadata", {}).get(PEFT_CONFIG_KEY)
    if adapter is not None:  # a fine-tuning run's checkpoint: the same adapter layers, then its tensors
        from parallax.peft import adapter_config_from_dict, get_peft_model

        get_peft_model(model, adapter_config_from_dict(json.loads(adapter)))
    for alias, name in manifest["aliases"].items():
        tensors.setdefault(alias, tensors[name])
    model.load_state_dict(tensors)
    return model


def saved_tokenizer_reference(manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``tokenizer_reference`` a checkpoint's manifest records (bytes for older checkpoints)."""
    saved = manifest.get("extra", {}).get("metadata", {}).get(TOKENIZER_KEY)
    return _BYTE_REFERENCE if saved is None else json.loads(saved)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer the checkpoint at ``path`` was trained with, checked to be unchanged since;
    ``TokenizerError`` naming the checkpoint when it is gone or its files changed."""
    return tokenizer_from_reference(saved_tokenizer_reference(checkpoint.read_manifest(path)), f"checkpoint {path}")
