"""``AlignConfig``: ``parallax align``'s knobs, ``parallax finetune``'s (base model, adapter,
packing, outputs, the loop and runtime) plus the preference method and its coefficients.

The loop is ``parallax train``'s with two hooks: ``batch_loss`` (the preference loss of a batch,
TRL's statistics) and ``prepare_training`` (full fine-tuning with a reference method: the
reference log-probabilities of every pair, computed once by the initial model before the first
step and kept in ``OUT/reference_logps.pt`` for a resumed run: never two models in memory)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parallax.align.objective import METHODS, PreferenceObjective
from parallax.finetune.config import FinetuneConfig
from parallax.models import ModelConfig
from parallax.train.config import ConfigError, _field

__all__ = ["AlignConfig", "REFERENCE_FILE"]

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.pt"


@dataclass(kw_only=True)
class AlignConfig(FinetuneConfig):
    """One preference-tuning run; a bad value raises ``ConfigError`` naming the field."""

    method: str = _field("dpo", "preference loss: dpo (sigmoid), ipo, hinge (against the reference: the base "
                                "weights, LoRA disabled, or precomputed for --full), simpo, orpo (reference-free)",
                         choices=METHODS)
    beta: float = _field(0.1, "the loss's beta (> 0): DPO's KL weight, IPO's tau, SimPO's reward scale, ORPO's "
                              "odds-ratio weight")
    label_smoothing: float = _field(0.0, "conservative DPO / SimPO: the assumed share of flipped labels, in [0, 0.5)")
    simpo_gamma: float = _field(0.5, "SimPO's target margin over beta (gamma / beta)")
    data: str | None = _field(None, "JSONL file or directory of preference rows {{prompt, chosen, rejected}} "
                                    "(strings, or chat messages as TRL's conversational format)")
    steps: int = _field(200, "optimizer steps in the whole run (a resumed run continues up to this count)")
    lr: float = _field(5e-4, "peak learning rate: linear warmup, then cosine decay to lr x min_lr_ratio")
    batch_size: int = _field(8, "preference pairs per step per data-parallel rank (2x as many sequences)")
    eval_interval: int = _field(50, "validate every N steps (and at the end)")
    checkpoint_interval: int = _field(100, "save a checkpoint every N steps (and at the end)")
    out: str = _field("out-align", "run directory: metrics.jsonl (loss, rewards/*, logps/*), loss.png, "
                                   "checkpoints/, adapter/ or merged/")

    def __post_init__(self) -> None:
        if self.data is None:
            raise ConfigError("data: give a JSONL file or directory of preference rows {prompt, chosen, rejected}")
        if self.loss != "auto":
            raise ConfigError(f"loss {self.loss!r}: preference tuning trains on the completions; leave --loss unset")
        try:
            PreferenceObjective(self.method, self.beta, self.label_smoothing, self.simpo_gamma)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.method in ("dpo", "ipo", "hinge") and self.prefix is not None:
            raise ConfigError(f"method {self.method!r} needs a reference model and prefix tuning has none inside the "
                              "model: use --lora, --full, or a reference-free method (simpo, orpo)")
        super().__post_init__()

    @property
    def objective(self) -> PreferenceObjective:
        return PreferenceObjective(self.method, self.beta, self.label_smoothing, self.simpo_gamma)

    @property
    def model_name(self) -> str:
        return f"{self.method.upper()} ({super().model_name.replace(' fine-tune', '')})"

    # -- hooks of the parallax train loop ----------------------------------------------------

    def load_data(self, tokenizer: Any, model_config: ModelConfig):
        from parallax.align.data import load_preference_data
        from parallax.align.dataset import PreferenceDataset

        length = model_config.block_size - (self.adapter_config().num_virtual_tokens if self.tuning == "prefix" else 0)
        splits = load_preference_data(self.data, tokenizer, max_length=length, val_path=self.val,
                                      val_fraction=self.val_fraction, seed=self.seed)
        pad = getattr(tokenizer, "pad_token_id", None)
        return PreferenceDataset(splits, tokenizer, packing=self.packing, block_size=length,
                                 pad_id=pad if pad is not None else tokenizer.eot_id)

    def batch_loss(self, model: Any, batch: Any) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        loss, stats = self.objective(model, batch)
        return loss, batch.num_pairs, stats

    def prepare_training(self, model: Any, ds: Any, info: Any, device: torch.device, resuming: bool) -> None:
        """Full fine-tuning with a reference method: the initial model's log-probabilities of every
        pair (computed on every rank alike: ZeRO-3 gathers need all of them), saved by rank 0 for a
        resumed run, whose model is no longer the initial one."""
        if not self.objective.needs_reference or hasattr(model, "disable_adapter"):
            return
        path = Path(self.out) / REFERENCE_FILE
        if resuming:
            saved = torch.load(path, weights_only=True) if path.is_file() else None
            if saved is None or saved.get("content_hash") != ds.content_hash:
                raise ConfigError(f"resume: {path} is missing or was computed for other data; the reference "
                                  "log-probabilities come from the initial model, so restart the run with --overwrite")
            ds.reference = {split: saved[split] for split in ("train", "val")}
            return
        ds.reference = {split: _reference_table(model, ds, split, self.batch_size, device) for split in ("train", "val")}
        if info.is_main:
            tmp = path.with_suffix(".tmp")
            torch.save({**ds.reference, "content_hash": ds.content_hash}, tmp)
            tmp.replace(path)  # atomic: a kill leaves the old file or the new one
        log.info("align: reference log-probabilities of %d + %d pairs precomputed", len(ds.splits.train),
                 len(ds.splits.val))


@torch.no_grad()
def _reference_table(model: Any, ds: Any, split: str, batch_size: int, device: torch.device) -> torch.Tensor:
    """(N, 2) fp32 on the CPU: summed log-probabilities of each pair's chosen and rejected completion."""
    from parallax.align.objective import sequence_sums

    pairs = ds.pairs(split)
    table = torch.zeros(len(pairs), 2)
    training = model.training
    model.eval()
    for start in range(0, len(pairs), batch_size):
        indices = list(range(start, min(start + batch_size, len(pairs))))
        batch = ds.batch_of(split, indices, device)
        logps = sequence_sums(model, batch)[0].cpu()
        table[indices, 0], table[indices, 1] = logps[:len(indices)], logps[len(indices):]
    model.train(training)
    return table
