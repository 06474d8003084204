"""Pipeline parallelism: a model split into stages by its blocks, run with GPipe, 1F1B or
interleaved 1F1B over point-to-point sends, composed with ZeRO 0-2 data parallelism.

    stage = build_stage(model, mesh, virtual_stages=1)          # this rank's blocks, original names
    model, opt = px.initialize(stage, config, group=mesh.dp_group)
    pipe = PipelineSchedule(model, opt, mesh, schedule="1f1b", micro_batches=8)
    loss = pipe.train_step(idx, targets); opt.step(); opt.zero_grad()
"""

from parallax.parallel.pipeline.executor import PipelineSchedule
from parallax.parallel.pipeline.schedules import (
    SCHEDULES,
    Action,
    bubble_fraction,
    check_schedule,
    schedule_actions,
    simulate,
)
from parallax.parallel.pipeline.split import PipelineStage, build_stage, check_pipeline, stage_layout

__all__ = ["PipelineSchedule", "PipelineStage", "build_stage", "check_pipeline", "stage_layout", "SCHEDULES",
           "Action", "bubble_fraction", "check_schedule", "schedule_actions", "simulate"]
