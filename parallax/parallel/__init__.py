"""Tensor and pipeline parallelism composed with ZeRO data parallelism on a ``(pp, dp, tp)`` mesh.

Parallelism stays out of the model code (torchtitan's rule): ``parallelize`` swaps a model's
linear layers and embeddings for tensor-parallel ones by module names, and ``build_stage``
splits a model into pipeline stages by its blocks.

    mesh = init_mesh(ParallelDims.for_world(world_size, tp=2, pp=2))
    torch.manual_seed(0); model = build_model(config)         # the full model, same seed on every rank
    stage = build_stage(parallelize(model, mesh), mesh)        # this rank's tensor-parallel stage
    stage, opt = px.initialize(stage, px.RuntimeConfig(zero_stage=1), group=mesh.dp_group)
    pipe = PipelineSchedule(stage, opt, mesh, schedule="1f1b", micro_batches=8)
    loss = pipe.train_step(idx, targets); opt.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()
"""

from parallax.parallel.mesh import Mesh, ParallelDims, init_mesh
from parallax.parallel.pipeline import (
    PipelineSchedule,
    PipelineStage,
    bubble_fraction,
    build_stage,
    check_pipeline,
    schedule_actions,
    stage_layout,
)
from parallax.parallel.state import ParallelState, attach_parallel_state, parallel_state, tp_slice
from parallax.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_tensor_parallel,
    gather_tensor_parallel,
    lm_head_loss,
    parallelize,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

__all__ = ["Mesh", "ParallelDims", "init_mesh", "ParallelState", "attach_parallel_state", "parallel_state",
           "tp_slice", "parallelize", "check_tensor_parallel", "gather_tensor_parallel", "lm_head_loss",
           "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
           "vocab_parallel_linear_cross_entropy", "PipelineSchedule", "PipelineStage", "build_stage",
           "check_pipeline", "stage_layout", "schedule_actions", "bubble_fraction"]
