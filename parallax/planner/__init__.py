"""The planner: per-rank peak memory and step time of every ZeRO stage x precision x offload x
checkpointing (and tensor x pipeline mesh x micro-batch count when asked).

    p = px.plan("gpt2", world_size=8, device_bytes="16GB", seq_len=1024, micro_batch=8)
    print(p.table())                                      # every configuration, the pick marked
    model, opt = px.initialize(model, p)                  # = p.best.runtime_config()
    p = px.plan("gpt2", 16, "16GB", 1024, 32, tp="auto", pp="auto", micro_batches="auto")
    p.best.tp, p.best.pp, p.best.micro_batches          # + the ZeRO configuration on dp = 16 / (tp pp)

How it predicts (each part is a module here):

* ``trace``: one forward + backward of the model on fake tensors (no memory, no compute): every
  storage autograd creates and frees, hence the activations, their transients and the
  gradients over time, with and without activation checkpointing; and the FLOPs.
* ``states``: the flat buffers ``px.zero.shard`` would build (same bucketing, units, padding),
  the model states each rank keeps, and a replay of the runtime's allocations (gradient
  buckets, reductions in flight, stage-3 gathers and prefetch) along the trace: the peak.
* ``cost``: a step-time model (compute, tensor-parallel all-reduces, the pipeline bubble and
  sends, the data-parallel reduction, the optimizer step) to rank candidates.
* ``partition``: tensor x pipeline meshes (``plan(..., tp="auto", pp="auto", micro_batches="auto")``):
  the degrees that divide heads, layers and world, and what the worst rank of a stage holds.
* ``search``: ``plan()``, the candidates and the pick; ``cli``: ``parallax plan``.
* ``calibrate``: this machine's matmul rate and a ring all-reduce's latency and bandwidth.
* ``measure``: the measured peak of CPU code (``torch.profiler`` memory events), against which
  the predictions are checked (``tests/test_plan.py``, ``python -m bench memory``).
"""

from parallax.planner.cli import plan_main
from parallax.planner.cost import Hardware
from parallax.planner.device import device_memory_bytes
from parallax.planner.measure import CpuMemoryProfile
from parallax.planner.search import Estimate, Plan, plan, zero_formula_bytes
from parallax.planner.units import format_bytes, parse_bytes

__all__ = ["CpuMemoryProfile", "Estimate", "Hardware", "Plan", "device_memory_bytes", "format_bytes", "parse_bytes",
           "plan", "plan_main", "zero_formula_bytes"]
