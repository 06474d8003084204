"""``finetune``: ``parallax train``'s loop on SFT data with an adapter (or none), then the output:
the adapter in PEFT's format (``OUT/adapter``) or the merged model (``OUT/merged``), made from the
run's final checkpoint by rank 0 (so it is the same at any ZeRO stage and world size)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from parallax.finetune.config import FinetuneConfig
from parallax.train.loop import TrainResult, train

__all__ = ["FinetuneResult", "finetune", "export"]

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    train: TrainResult
    written: Path | None  # OUT/adapter or OUT/merged (rank 0), else None


def finetune(cfg: FinetuneConfig, *, progress: bool = True, on_step=None) -> FinetuneResult:
    """Run (or resume) the fine-tuning ``cfg`` describes; rank 0 then writes its output."""
    result = train(cfg, progress=progress, on_step=on_step)
    written = export(cfg) if int(os.environ.get("RANK", "0")) == 0 else None
    return FinetuneResult(result, written)


def export(cfg: FinetuneConfig) -> Path:
    """Write ``cfg.writes`` from the run's newest checkpoint: OUT/adapter (adapter_config.json +
    adapter_model.safetensors, PEFT's format, naming the base model) or OUT/merged (a parallax
    checkpoint of the model with the adapter merged in)."""
    from parallax import checkpoint
    from parallax.train.checkpoints import latest_checkpoint, load_model, save_model, saved_tokenizer_reference

    final = latest_checkpoint(Path(cfg.out) / "checkpoints")
    manifest = checkpoint.read_manifest(final)
    model = load_model(final)
    if cfg.writes == "adapter":
        target = Path(cfg.out) / "adapter"
        base = str(Path(cfg.base_checkpoint() if cfg.base else cfg.hf).resolve())
        model.save_adapter(target, base_model_name_or_path=base)
    else:
        target = Path(cfg.out) / "merged"
        if cfg.tuning == "lora":
            model = model.merge_and_unload()
        save_model(target, model, step=manifest["step"], model_config=model.config,
                   tokenizer=saved_tokenizer_reference(manifest))
    log.info("finetune: wrote %s (%s)", target, cfg.writes)
    return target
