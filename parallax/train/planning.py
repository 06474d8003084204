"""``parallax train --plan``: let the memory planner choose the ZeRO stage, precision, offload,
activation checkpointing and (over several ranks) the tensor/pipeline mesh of a run."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Collection

import torch

from parallax.train.config import ConfigError, TrainConfig

__all__ = ["PLANNED_FIELDS", "resolve_plan"]

log = logging.getLogger(__name__)

# The TrainConfig fields the planner chooses; one given explicitly is kept and narrows the search.
PLANNED_FIELDS = ("zero_stage", "precision", "offload", "activation_checkpointing", "tp", "pp", "micro_batches")


def resolve_plan(cfg: TrainConfig, fixed: Collection[str] = ()) -> TrainConfig:
    """``cfg`` with the planner's pick for ``PLANNED_FIELDS`` (those in ``fixed`` kept), ``plan`` "off".

    The plan is for this run's model, ``batch_size`` x ``block_size`` tokens per rank, the world
    size (``WORLD_SIZE`` under torchrun, else ``nproc``) and ``cfg.plan`` bytes per device ("auto":
    the GPU's total memory, or RAM / local ranks on CPU). Every rank computes the same plan (the
    trace runs on fake tensors and is deterministic). On CPU, fp16 is not a candidate (CPU
    matmuls gain nothing from it). Raises ConfigError when nothing fits.
    """
    from parallax.planner import plan

    if cfg.plan == "off":
        return cfg
    unknown = sorted(set(fixed) - set(PLANNED_FIELDS))
    if unknown:
        raise ConfigError(f"fixed: {unknown} are not fields the planner chooses ({', '.join(PLANNED_FIELDS)})")
    world = int(os.environ.get("WORLD_SIZE", cfg.nproc))
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    checkpointing = ("none", "block") if "activation_checkpointing" not in fixed else (
        "none" if cfg.activation_checkpointing == "off" else cfg.activation_checkpointing,)
    precisions = (cfg.precision,) if "precision" in fixed else (("fp32", "bf16", "fp16") if on_cuda else ("fp32", "bf16"))
    stages = (cfg.zero_stage,) if "zero_stage" in fixed else (0, 1, 2, 3)
    offloads = (cfg.offload,) if "offload" in fixed else ("none", "cpu")
    # The mesh is searched where the run can use one (several ranks, parallax train's loss); a
    # degree given explicitly is kept.
    searched = world > 1 and cfg.supports_model_parallel
    mesh = {name: getattr(cfg, name) if name in fixed or not searched else "auto"
            for name in ("tp", "pp", "micro_batches")}
    device_bytes = cfg.plan
    if device_bytes == "auto" and not on_cuda:
        from parallax.planner import device_memory_bytes

        device_bytes = device_memory_bytes("cpu", local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", cfg.nproc)))
    model_config = cfg.model_config(cfg.load_tokenizer().vocab_size)
    try:
        result = plan(cfg.plan_model(model_config), world, device_bytes, model_config.block_size, cfg.batch_size, stages=stages,
                      precisions=precisions, offloads=offloads, checkpointing=checkpointing, bucket_mb=cfg.bucket_mb,
                      prefetch=cfg.prefetch, backend="nccl" if on_cuda else "gloo", schedule=cfg.schedule,
                      virtual_stages=cfg.virtual_stages, sequence_parallel=cfg.sequence_parallel, **mesh)
    except ValueError as exc:
        raise ConfigError(f"plan: {exc}") from None
    # Rank 0 prints the table; so does a single process, but not the parent that relaunches
    # itself under torchrun for nproc > 1 (its rank 0 prints it).
    relaunching = cfg.nproc > 1 and "RANK" not in os.environ
    if int(os.environ.get("RANK", "0")) == 0 and not relaunching:
        log.info("%s", result.table())
    best = result.best
    if best is None:
        raise ConfigError(f"plan: no configuration of {', '.join(PLANNED_FIELDS)} fits in {cfg.plan} per device "
                          f"with batch_size {cfg.batch_size} x block_size {model_config.block_size} on {world} rank(s); "
                          "lower batch_size or block_size, add ranks, or give more memory")
    chosen = dict(zero_stage=best.zero_stage, precision=best.precision, offload=best.offload,
                  activation_checkpointing="off" if best.checkpointing == "none" else best.checkpointing,
                  tp=best.tp, pp=best.pp, micro_batches=best.micro_batches)
    if not relaunching:
        log.info("plan: %s (predicted peak %.1f MiB per rank)", best.label, best.peak_bytes / 2**20)
    return dataclasses.replace(cfg, plan="off", **{k: v for k, v in chosen.items() if k not in fixed})
