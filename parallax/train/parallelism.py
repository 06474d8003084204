"""``--tp/--pp`` in the train loop: the mesh, the checks of its sizes against the model (before any
rank allocates memory), and the model (tensor-parallel, then this rank's pipeline stage) that ZeRO
shards over the data-parallel group."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from parallax.models import ModelConfig
from parallax.parallel.mesh import Mesh, ParallelDims, init_mesh
from parallax.train.config import ConfigError, TrainConfig

__all__ = ["DataShard", "check_model_parallel", "setup_mesh", "parallelize_for_training", "pipeline_for_training"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataShard:
    """Which slice of each batch a rank trains on: the ranks of one tensor/pipeline group share
    their data-parallel replica's (``rank`` of ``world_size`` replicas)."""

    rank: int
    world_size: int


def check_model_parallel(cfg: TrainConfig, model_config: ModelConfig, world_size: int) -> None:
    """ConfigError unless the mesh fits the world and the model: tp dividing heads, KV heads and
    the vocabulary, n_layer dividing into pp x virtual_stages stages, the sequence into tp slices."""
    if not cfg.model_parallel:
        return
    from parallax.parallel.pipeline import check_pipeline
    from parallax.parallel.tensor import check_tensor_parallel

    try:
        ParallelDims.for_world(world_size, tp=cfg.tp, pp=cfg.pp)
        if cfg.tp > 1:
            check_tensor_parallel(model_config, cfg.tp)
        if cfg.pp > 1:
            check_pipeline(model_config.n_layer, cfg.pp, cfg.virtual_stages)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.sequence_parallel and model_config.block_size % cfg.tp:
        raise ConfigError(f"sequence_parallel: block_size {model_config.block_size} must divide by tp {cfg.tp} "
                          "(each tensor-parallel rank holds an equal slice of the sequence)")
    if cfg.schedule == "interleaved" and cfg.micro_batches % cfg.pp:
        raise ConfigError(f"schedule interleaved: micro_batches {cfg.micro_batches} must be a multiple of pp "
                          f"{cfg.pp} (Megatron-LM's rule for the interleaved 1F1B schedule)")


def setup_mesh(cfg: TrainConfig, rank: int, world_size: int) -> tuple[Mesh | None, DataShard]:
    """The mesh of a ``--tp/--pp`` run (None without them) and this rank's data shard."""
    if not cfg.model_parallel:
        return None, DataShard(rank, world_size)
    mesh = init_mesh(ParallelDims.for_world(world_size, tp=cfg.tp, pp=cfg.pp))
    log.info("mesh: pp=%d x dp=%d x tp=%d; rank %d is stage %d, replica %d, tensor slice %d", mesh.dims.pp,
             mesh.dims.dp, mesh.dims.tp, rank, mesh.pp_rank, mesh.dp_rank, mesh.tp_rank)
    return mesh, DataShard(mesh.dp_rank, mesh.dims.dp)


def parallelize_for_training(cfg: TrainConfig, model: nn.Module, mesh: Mesh | None) -> nn.Module:
    """``model`` split over the mesh: tensor-parallel layers (in place), then this rank's pipeline
    stage; the module ZeRO then shards over ``mesh.dp_group``. Unchanged without a mesh."""
    if mesh is None:
        return model
    from parallax.parallel.pipeline import build_stage
    from parallax.parallel.tensor import parallelize

    model = parallelize(model, mesh, sequence_parallel=cfg.sequence_parallel)
    if cfg.pp > 1:
        model = build_stage(model, mesh, virtual_stages=cfg.virtual_stages)
    return model


def pipeline_for_training(cfg: TrainConfig, model: nn.Module, optimizer: Any, mesh: Mesh | None) -> Any:
    """The pipeline schedule of a ``--pp`` run (``train_step``/``eval_step``), else None."""
    if mesh is None or cfg.pp == 1:
        return None
    from parallax.parallel.pipeline import PipelineSchedule

    return PipelineSchedule(model, optimizer, mesh, schedule=cfg.schedule, micro_batches=cfg.micro_batches)
