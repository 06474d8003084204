"""``RuntimeConfig``: how parallax runs a model (ZeRO stage, precision, offload, checkpointing).

Its own module so that ``parallax.runtime`` (which applies it) and ``parallax.planner`` (which
chooses it) both import it without importing each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from parallax.checkpoint.activation import _parse_policy as select_blocks_policy
from parallax.zero import STAGES
from parallax.zero.optimizer import OFFLOAD

__all__ = ["RuntimeConfig", "PRECISIONS"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(kw_only=True)
class RuntimeConfig:
    """How parallax runs a model.

    zero_stage: 0 = data parallel (all-reduce), 1 = + sharded optimizer state, 2 = + sharded
        gradients, 3 = + sharded parameters.
    bucket_mb: gradient bucket size for stages 0-2 (reduction starts when a bucket is full).
    prefetch: stage 3: how many units to gather ahead of use.
    timeout_s: every collective fails with a clear error after this long (a dead rank).
    precision: "fp32", "bf16" or "fp16": the dtype of parameters, compute and communication; the
        optimizer keeps fp32 master weights and moments (sharded per stage). fp16 adds dynamic
        loss scaling (``px.amp.LossScaler``) inside the optimizer's backward/step.
    offload: "none" or "cpu": fp32 master weights and Adam moments in pinned host memory, stepped
        by the C++ CPU AdamW with copies overlapped (stages 1-3).
    activation_checkpointing: False, True (= "block": every repeated block), "every_n:K", or a
        callable ``(index, block) -> bool``: keep only block inputs, recompute in backward.
    activation_offload: with checkpointing, keep the saved block inputs in pinned host memory.
    """

    zero_stage: int = 0
    bucket_mb: float = 25.0
    prefetch: int = 1
    timeout_s: float = 600.0
    precision: str = "fp32"
    offload: str = "none"
    activation_checkpointing: bool | str = False
    activation_offload: bool = False

    def __post_init__(self) -> None:
        if self.zero_stage not in STAGES:
            raise ValueError(f"zero_stage must be one of {STAGES}, got {self.zero_stage!r}")
        if not (isinstance(self.bucket_mb, (int, float)) and self.bucket_mb > 0):
            raise ValueError(f"bucket_mb must be a positive number, got {self.bucket_mb!r}")
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"prefetch must be a non-negative integer, got {self.prefetch!r}")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.offload not in OFFLOAD:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD)}, got {self.offload!r}")
        if self.activation_checkpointing not in (False, True):
            try:
                select_blocks_policy(self.activation_checkpointing)
            except ValueError as exc:
                raise ValueError(f"activation_checkpointing: {exc}") from None
        if self.offload == "cpu" and self.zero_stage == 0:
            raise ValueError("offload='cpu' needs zero_stage 1, 2 or 3 (offload supports stages 1-3: stage 0 "
                             "replicates the optimizer state on every rank)")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
