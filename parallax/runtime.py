"""``RuntimeConfig`` and ``initialize``: one call that prepares a model and optimizer for a plain loop."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallax.amp import LossScaler
from parallax.checkpoint.activation import _parse_policy as select_blocks_policy
from parallax.checkpoint.activation import activation
from parallax.optim import AdamW
from parallax.zero import STAGES, ZeroOptimizer, shard
from parallax.zero.module import LAUNCH_HINT
from parallax.zero.optimizer import OFFLOAD

__all__ = ["RuntimeConfig", "initialize", "PRECISIONS"]

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


def _ensure_process_group(config: RuntimeConfig) -> None:
    if dist.is_available() and dist.is_initialized():
        return
    if dist.is_available() and all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=config.timeout_s))
        return
    raise RuntimeError(f"px.initialize needs a torch.distributed process group: {LAUNCH_HINT}")


def _check_precision(model: nn.Module, config: RuntimeConfig) -> None:
    """Fail early, and clearly, where this device and build cannot multiply in the dtype."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    a = torch.ones(8, 8, dtype=config.dtype, device=device)
    try:
        product = a @ a
    except RuntimeError as exc:
        raise ValueError(f"precision {config.precision!r}: this build of torch cannot run {config.precision} "
                         f"matrix multiplications on {device} ({exc}); use precision 'bf16' or 'fp32'") from None
    if not torch.all(product == 8):
        raise ValueError(f"precision {config.precision!r}: {device} computed a wrong {config.precision} matmul")


def _runtime_config(config: Any) -> RuntimeConfig:
    """``config`` as a RuntimeConfig: a planner's ``Plan`` gives its pick, an ``Estimate`` its row."""
    from parallax.planner import Estimate, Plan

    if config is None:
        return RuntimeConfig()
    if isinstance(config, RuntimeConfig):
        return config
    if isinstance(config, Plan):
        if config.best is None:
            raise ValueError(f"config: the plan has no configuration that fits in {config.usable_bytes} bytes per "
                             "rank (plan.table() shows every candidate): more ranks, a smaller micro-batch or "
                             "sequence, or more device memory")
        return config.best.runtime_config()
    if isinstance(config, Estimate):
        return config.runtime_config()
    raise TypeError(f"config must be a px.RuntimeConfig, a px.plan(...) result or one of its estimates, "
                    f"got {type(config).__name__}")


def initialize(model: nn.Module, config: Any = None, *,
               optimizer_cls: type[torch.optim.Optimizer] = AdamW,
               param_groups: Iterable[dict[str, Any]] | None = None,
               units: Sequence[nn.Module] | None = None,
               group: dist.ProcessGroup | None = None,
               **optimizer_kwargs: Any) -> tuple[nn.Module, ZeroOptimizer]:
    """Shard ``model`` as ``config`` says and build its optimizer; returns ``(model, optimizer)``.

    ``config``: a ``RuntimeConfig`` (default: ``RuntimeConfig()``), or a ``px.plan(...)`` result,
    whose pick (``plan.best``: the fastest configuration expected to fit) is used.

    Under torchrun the process group is created from the environment if needed. The optimizer
    has ``backward(loss)``, ``step()``, ``zero_grad()``, ``clip_grad_norm_()`` and state dicts;
    gradient accumulation uses ``model.set_requires_gradient_sync(False)`` or ``model.no_sync()``.
    """
    config = _runtime_config(config)
    _ensure_process_group(config)
    if config.precision != "fp32":
        _check_precision(model, config)
        model.to(config.dtype)
    if config.activation_checkpointing:
        policy = "block" if config.activation_checkpointing is True else config.activation_checkpointing
        activation(model, policy, offload=config.activation_offload)
    model = shard(model, stage=config.zero_stage, group=group, prefetch=config.prefetch,
                  bucket_mb=config.bucket_mb, units=units, timeout_s=config.timeout_s)
    scaler = LossScaler() if config.precision == "fp16" else None
    optimizer = ZeroOptimizer(model, optimizer_cls, param_groups=param_groups, offload=config.offload,
                              loss_scaler=scaler, **optimizer_kwargs)
    return model, optimizer
