"""The memory planner: per-rank peak memory of every ZeRO stage x precision x offload x checkpointing.

    p = px.plan("gpt2", world_size=8, device_bytes="16GB", seq_len=1024, micro_batch=8)
    print(p.table())                                      # every configuration, the pick marked
    model, opt = px.initialize(model, p)                  # = p.best.runtime_config()

How it predicts (each part is a module here):

* ``trace``: one forward + backward of the model on fake tensors (no memory, no compute): every
  storage autograd creates and frees, hence the activations, their transients and the
  gradients over time, with and without activation checkpointing; and the FLOPs.
* ``states``: the flat buffers ``px.zero.shard`` would build (same bucketing, units, padding),
  the model states each rank keeps, and a replay of the runtime's allocations (gradient
  buckets, reductions in flight, stage-3 gathers and prefetch) along the trace: the peak.
* ``cost``: a step-time model (compute + communication + optimizer step) to rank candidates.
* ``search``: ``plan()``, the candidates and the pick; ``cli``: ``parallax plan``.
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
