"""``DistillConfig``: ``parallax distill``'s knobs, ``parallax train``'s (data, steps, optimizer,
ZeRO, precision, resume, outputs) plus the teacher and the distillation loss.

The loop is ``parallax train``'s with three hooks. ``prepare_training`` loads the teacher on
every rank (not sharded: each rank holds it whole, or in CPU memory with ``teacher_offload``),
in the compute dtype, in eval mode, without gradients. ``batch_loss`` runs the student through
its own forward (so ZeRO-3 gathers its weights as for any step; the forward's fused
cross-entropy is the hard-label term), captures the student's final hidden states with a hook on
its final norm, and adds the soft term ``px.compress.distill_loss(alpha=0)`` from those and the
teacher's hidden states, both through their LM heads in chunks. In evaluation (the loop's
held-out ``val_loss``) only the student's cross-entropy is reported, so the validation loss of a
distilled run compares with a plain ``parallax train`` run's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallax.compress.distill import DIVERGENCES, distill_loss
from parallax.models import ALL_PRESETS, ModelConfig, config_from_dict, family_of
from parallax.train.config import ConfigError, TrainConfig, _field

__all__ = ["DistillConfig", "load_teacher", "offload_blocks", "final_norm"]

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(kw_only=True)
class DistillConfig(TrainConfig):
    """One distillation run; a bad value raises ``ConfigError`` naming the field."""

    supports_model_parallel = False  # the teacher and the KD loss are not parallelized

    teacher: str | None = _field(None, "the teacher: a parallax checkpoint or `parallax train` run directory (its "
                                       "newest checkpoint); or give --teacher-hf DIR")
    teacher_hf: str | None = _field(None, "the teacher: a Hugging Face model directory")
    student: str | None = _field(None, "the student: a preset (random init, --model overrides its fields, e.g. "
                                       "--model n_layer=2) or a parallax checkpoint / run directory to start from; "
                                       "or give --student-hf DIR. Default: --preset")
    student_hf: str | None = _field(None, "the student: a Hugging Face model directory to start from")
    alpha: float = _field(0.5, "weight of the cross-entropy on the data; 1 - alpha weighs the divergence to the "
                               "teacher (times temperature^2, Hinton et al.)")
    temperature: float = _field(1.0, "softmax temperature of both models' distributions in the divergence (> 0)")
    divergence: str = _field("forward_kl", "forward_kl KL(teacher||student), reverse_kl KL(student||teacher) or jsd",
                             choices=DIVERGENCES)
    teacher_offload: bool = _field(False, "keep the teacher's blocks in CPU memory, moving one block at a time to "
                                          "the device for its forward")
    out: str = _field("out-distill", "run directory: metrics.jsonl, loss.png, checkpoints/ (the student's)")

    def __post_init__(self) -> None:
        if (self.teacher is None) == (self.teacher_hf is None):
            raise ConfigError("teacher: give exactly one of --teacher CHECKPOINT_OR_RUN and --teacher-hf DIR")
        if self.student is not None and self.student_hf is not None:
            raise ConfigError("student and student_hf exclude each other: distill into one model")
        if self.student_hf is not None:
            if self.hf is not None and self.hf != self.student_hf:
                raise ConfigError("hf and student_hf name two students: give one")
            self.hf = self.student_hf
        elif self.student in ALL_PRESETS:
            self.preset = self.student
        elif self.student is not None and self.share_layers is not None:
            raise ConfigError(f"share_layers: the student checkpoint {self.student} has its shape already; weight "
                              "sharing is for a student trained from a preset")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise ConfigError(f"temperature must be a positive number, got {self.temperature!r}")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        super().__post_init__()

    # -- where the two models come from ------------------------------------------------------

    def _checkpoint(self, path: str, flag: str) -> Path:
        from parallax.inference.cli import find_checkpoint

        try:
            return find_checkpoint(path)
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from None

    @property
    def student_checkpoint(self) -> Path | None:
        """The checkpoint the student starts from, when --student names one (not a preset)."""
        if self.student is None or self.student in ALL_PRESETS:
            return None
        return self._checkpoint(self.student, "student")

    def teacher_config(self) -> ModelConfig:
        """The teacher's model config, read without loading its weights."""
        if self.teacher_hf is not None:
            from parallax.models import read_hf_config

            return read_hf_config(self.teacher_hf)
        return _saved_config(self._checkpoint(self.teacher, "teacher"), "teacher")

    @property
    def model_name(self) -> str:
        teacher = self.teacher if self.teacher is not None else f"hf:{self.teacher_hf}"
        return f"{super().model_name if self.student_checkpoint is None else self.student} distilled from {teacher}"

    @property
    def tokenizer_source(self) -> str:
        if self.tokenizer or self.hf:
            return super().tokenizer_source
        source = self.student if self.student_checkpoint is not None else self.teacher
        return f"the tokenizer of {source}" if source is not None else self.teacher_hf

    def load_tokenizer(self):
        """--tokenizer, else the student's (Hugging Face directory or checkpoint), else the teacher's."""
        if self.tokenizer or self.hf:
            return super().load_tokenizer()
        from parallax.data import load_tokenizer
        from parallax.train.checkpoints import load_tokenizer as checkpoint_tokenizer

        if self.student_checkpoint is not None:
            return checkpoint_tokenizer(self.student_checkpoint)
        if self.teacher is not None:
            return checkpoint_tokenizer(self._checkpoint(self.teacher, "teacher"))
        return load_tokenizer(self.teacher_hf)

    def model_config(self, tokenizer_vocab_size: int | None = None) -> ModelConfig:
        """The student's config (preset, Hugging Face directory or checkpoint, then --model);
        with ``tokenizer_vocab_size``, also checked to share the teacher's vocabulary."""
        checkpoint = self.student_checkpoint
        if checkpoint is None:
            config = super().model_config(tokenizer_vocab_size)
        else:
            overrides = dict(self.model) | ({"block_size": self.block_size} if self.block_size is not None else {})
            saved = _saved_config(checkpoint, "student")
            config = config_from_dict(family_of(saved), {**saved.to_dict(), **overrides})
        if tokenizer_vocab_size is not None:
            teacher, name = self.teacher_config(), self.teacher or self.teacher_hf
            if teacher.vocab_size != config.vocab_size:
                raise ConfigError(f"teacher {name} has a vocabulary of {teacher.vocab_size} tokens but the student "
                                  f"has {config.vocab_size}; distillation needs one vocabulary (the same tokenizer)")
            if teacher.block_size < config.block_size:
                raise ConfigError(f"block_size {config.block_size}: the teacher {name} reads at most "
                                  f"{teacher.block_size} positions; lower --block-size")
        return config

    def build_model(self, model_config: ModelConfig) -> Any:
        checkpoint = self.student_checkpoint
        if checkpoint is None:
            return super().build_model(model_config)
        from parallax.train.checkpoints import load_model

        model = load_model(checkpoint)
        if model.config != model_config:
            raise ConfigError(f"student: --model/--block-size cannot change the shape of checkpoint {checkpoint} "
                              f"({model.config}); start from a preset to train another shape")
        return model

    # -- hooks of the parallax train loop ----------------------------------------------------

    def prepare_training(self, model: Any, ds: Any, info: Any, device: torch.device, resuming: bool) -> None:
        self._teacher = load_teacher(self.teacher, self.teacher_hf, device, _DTYPES[self.precision],
                                     offload=self.teacher_offload)
        log.info("distill: teacher %s (%.2fM parameters%s), alpha %g, temperature %g, %s",
                 self.teacher or self.teacher_hf, sum(p.numel() for p in self._teacher.parameters()) / 1e6,
                 ", offloaded" if self.teacher_offload else "", self.alpha, self.temperature, self.divergence)

    def batch_loss(self, model: Any, batch: Any) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """Training: alpha x the student's cross-entropy + (1 - alpha) x T^2 x the divergence, with
        the statistics ``ce`` and ``kd`` (sums over the targets). Evaluation: the cross-entropy."""
        idx, targets = batch[0], batch[1]
        units = int((targets >= 0).sum())
        if not model.training or self.alpha == 1.0:
            return model(*batch), units, {}
        captured: list[torch.Tensor] = []
        handle = final_norm(model).register_forward_hook(lambda _m, _a, out: captured.append(out))
        try:
            ce = model(*batch)  # under ZeRO-3 the root unit (with the head) stays gathered until backward ends
        finally:
            handle.remove()
        hidden = captured[-1]
        with torch.no_grad():
            teacher_hidden = self._teacher.hidden_states(idx)
        flat_targets = targets.reshape(-1).masked_fill(targets.reshape(-1) < 0, -100)
        kd = distill_loss(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                          teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), self._teacher.lm_head.weight,
                          flat_targets, alpha=0.0, temperature=self.temperature, divergence=self.divergence)
        loss = self.alpha * ce + (1.0 - self.alpha) * kd  # kd is T^2 x the divergence (distill_loss, alpha=0)
        return loss, units, {"ce": ce.detach() * units, "kd": kd.detach() * units}


def _saved_config(path: Path, flag: str) -> ModelConfig:
    from parallax import checkpoint
    from parallax.train.checkpoints import saved_model_config

    saved = saved_model_config(checkpoint.read_manifest(path))
    if saved is None:
        raise ConfigError(f"{flag}: {path} records no model config (was it written by parallax train?)")
    return saved


def final_norm(model: nn.Module) -> nn.Module:
    """The module whose output is the model's final hidden states (GPT ``transformer.ln_f``,
    Llama ``model.norm``)."""
    for path in ("transformer.ln_f", "model.norm"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"{type(model).__name__} has no final norm (transformer.ln_f or model.norm); distillation "
                     "needs a parallax model family")


def load_teacher(checkpoint: str | None, hf: str | None, device: torch.device | str, dtype: torch.dtype,
                 offload: bool = False) -> nn.Module:
    """The teacher from a checkpoint / run directory or a Hugging Face directory, in ``dtype``,
    eval mode, every parameter frozen; on ``device``, or with ``offload`` its repeated blocks
    kept in CPU memory (``offload_blocks``) and the rest on ``device``."""
    from parallax.train.model_source import load_trained

    teacher, _, _ = load_trained(checkpoint=checkpoint, hf=hf)
    teacher.to(dtype).eval().requires_grad_(False)
    if offload:
        return offload_blocks(teacher, torch.device(device))
    return teacher.to(device)


def offload_blocks(model: nn.Module, device: torch.device) -> nn.Module:
    """Keep ``model``'s repeated blocks in (pinned, when a GPU is there) CPU memory and move each to
    ``device`` only for its own forward (a pre-hook copies it in, a hook drops that copy), so one
    block's weights are on the device at a time; the other parameters (embeddings, final norm,
    head) live on ``device``. For inference only; on a CPU ``device`` the copies are the tensors."""
    from parallax.zero.module import default_units

    blocks = default_units(model)
    block_ids = {id(p) for block in blocks for p in block.parameters()}
    for p in model.parameters():
        if id(p) not in block_ids:
            p.data = p.data.to(device)
    for b in model.buffers():
        b.data = b.data.to(device)
    for block in blocks:
        params = list(block.parameters())
        # the CPU copies stay for the whole run: each forward only copies in and drops the device copy
        stored = [p.data.pin_memory() if device.type == "cuda" else p.data for p in params]
        block.register_forward_pre_hook(lambda _m, _args, params=params, stored=stored: _point(params, stored, device))
        block.register_forward_hook(lambda _m, _args, _out, params=params, stored=stored: _point(params, stored))
    return model


def _point(params: list[nn.Parameter], stored: list[torch.Tensor], device: torch.device | None = None) -> None:
    """Each parameter's data: its CPU copy, or with ``device`` a copy of it there."""
    for p, cpu in zip(params, stored):
        p.data = cpu if device is None else cpu.to(device, non_blocking=True)
