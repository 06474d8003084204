"""``initialize``: one call that prepares a model and optimizer for a plain loop, as a ``RuntimeConfig`` says."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallax.amp import LossScaler
from parallax.checkpoint.activation import activation
from parallax.optim import AdamW
from parallax.planner import Estimate, Plan
from parallax.runtime_config import PRECISIONS, RuntimeConfig
from parallax.zero import ZeroOptimizer, shard
from parallax.zero.module import LAUNCH_HINT

__all__ = ["RuntimeConfig", "initialize", "PRECISIONS"]

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
