"""What one rank of a ``(pp, dp, tp)`` mesh holds: the candidates and a stage's trace.

The planner traces the whole model once per micro-batch size and derives the worst rank of a
tensor- x pipeline-parallel group from that trace (``stage_trace``):

* parameters: the first pipeline stage's blocks (``n_layer / pp`` of them) and every parameter
  outside the blocks (embeddings, final norm, head: the first stage keeps the embeddings, the
  last the head, a tied embedding is on both; counting all of them on one stage is an upper
  bound by at most one of them); matrices (2-D parameters) are split ``tp`` ways, except
  position embeddings; norms and biases are replicated (column-parallel biases are in fact
  split: an upper bound by a few vectors);
* activations: the stage's share of the layers (``n_layer / pp``), scaled by
  ``tp_activation_factor`` (the tensor-parallel regions are split, the rest replicated unless
  sequence parallelism splits it too), and the saved activations of the other micro-batches in
  flight (``micro_batches_in_flight``) on top of the current one's timeline;
* ZeRO then shards this stage's parameters over the remaining ``dp = world / (tp pp)`` ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from parallax.planner.cost import SCHEDULES
from parallax.planner.trace import BWD_POST, BWD_PRE, FWD_POST, FWD_PRE, GRAD, ParamSpec, StepTrace

__all__ = ["ModelDims", "model_dims", "tp_candidates", "pp_candidates", "micro_batch_candidates",
           "tp_activation_factor", "micro_batches_in_flight", "stage_trace", "parse_degrees"]


@dataclass(frozen=True)
class ModelDims:
    """The sizes the mesh depends on (read from the model's config)."""

    n_layer: int
    n_head: int
    n_kv_head: int
    hidden: int


def model_dims(module: Any) -> ModelDims | None:
    """``ModelDims`` of a parallax GPT/Llama or a Hugging Face model (from ``module.config``); None
    when the config does not say."""
    config = getattr(module, "config", None)

    def field(*names: str) -> int | None:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    layers = field("n_layer", "num_hidden_layers")
    heads = field("n_head", "num_attention_heads")
    hidden = field("n_embd", "hidden_size")
    if layers is None or heads is None or hidden is None:
        return None
    return ModelDims(layers, heads, field("n_kv_head", "num_key_value_heads") or heads, hidden)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parse_degrees(name: str, value: Any) -> tuple[int, ...] | str:
    """``value`` (an int, a sequence of ints, or "auto") as a tuple of candidates or "auto"."""
    if value == "auto":
        return "auto"
    values = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, a sequence of them or 'auto', got {value!r}") from None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a positive integer, a sequence of them or 'auto', got {value!r}")
    return tuple(sorted(set(values)))


def tp_candidates(requested: tuple[int, ...] | str, world: int, dims: ModelDims | None) -> tuple[list[int], list[str]]:
    """Tensor-parallel degrees dividing the world size, the heads and the KV heads; and why the
    others were dropped."""
    asked = _divisors(world) if requested == "auto" else list(requested)
    keep, why = [], []
    for t in asked:
        if world % t:
            why.append(f"tp={t} does not divide the world size {world}")
        elif t > 1 and dims is None:
            why.append(f"tp={t} needs the model's heads and width (a model or config, not a parameter count)")
        elif t > 1 and (dims.n_head % t or dims.n_kv_head % t):
            why.append(f"tp={t} does not divide the {dims.n_head} heads and {dims.n_kv_head} KV heads")
        else:
            keep.append(t)
    return keep, why


def pp_candidates(requested: tuple[int, ...] | str, world: int, dims: ModelDims | None) -> tuple[list[int], list[str]]:
    """Pipeline degrees dividing the world size and the layer count; and why the others were dropped."""
    asked = _divisors(world) if requested == "auto" else list(requested)
    keep, why = [], []
    for p in asked:
        if world % p:
            why.append(f"pp={p} does not divide the world size {world}")
        elif p > 1 and dims is None:
            why.append(f"pp={p} needs the model's layers and width (a model or config, not a parameter count)")
        elif p > 1 and dims.n_layer % p:
            why.append(f"pp={p} does not divide the {dims.n_layer} layers")
        else:
            keep.append(p)
    return keep, why


def micro_batch_candidates(requested: tuple[int, ...] | str, batch: int, pp: int) -> list[int]:
    """Micro-batch counts that divide the per-replica ``batch``; "auto": 1 without a pipeline,
    else pp, 2 pp, 4 pp, ... (fewer than pp leaves stages idle)."""
    if requested == "auto":
        asked = [1] if pp == 1 else [pp * 2**k for k in range(batch.bit_length())]
    else:
        asked = list(requested)
    return [m for m in asked if batch % m == 0]


def tp_activation_factor(tp: int, sequence_parallel: bool = False) -> float:
    """Per-layer activation bytes with tensor parallelism over those without.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    Table 2): a layer saves s b h (34 + 5 a s / h) bytes; with tensor parallelism
    s b h (10 + 24 / t + 5 a s / (h t)) (the norms, dropouts and residuals, 10 of the 34, stay
    whole), with sequence parallelism as well s b h (34 / t + 5 a s / (h t)). The attention
    matrix term (5 a s / h) is absent with fused attention, as in parallax's models.
    """
    if tp == 1:
        return 1.0
    return 1.0 / tp if sequence_parallel else (10 + 24 / tp) / 34


def micro_batches_in_flight(schedule: str, pp: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Micro-batches whose activations the first stage holds at once (in whole-stage units).

    GPipe: all m forwards run before the first backward. 1F1B: at most pp. Interleaved
    (Megatron-LM's schedule): the first rank runs 2 (p-1) + (v-1) p warm-up chunk forwards and
    keeps one more, each 1/v of the stage: p + (p-1)/v. Never more than m.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(micro_batches)
    if schedule == "1f1b":
        return float(min(pp, micro_batches))
    return min(float(micro_batches), pp + (pp - 1) / virtual_stages)


def _tp_sharded(spec: ParamSpec) -> bool:
    return len(spec.shape) >= 2 and "wpe" not in spec.name and "position" not in spec.name


def _shard(spec: ParamSpec, tp: int) -> ParamSpec:
    if tp == 1 or not _tp_sharded(spec):
        return spec
    return dataclasses.replace(spec, shape=(-(-spec.shape[0] // tp), *spec.shape[1:]))


def stage_trace(trace: StepTrace, *, tp: int, pp: int, n_layer: int, activation_factor: float,
                in_flight: float) -> StepTrace:
    """The trace of the worst rank of a ``tp`` x ``pp`` group (see the module docstring).

    ``trace.units[1:]`` are the model's blocks in order; the stage keeps the first
    ``n_layer / pp`` of them and the root unit. Live activation bytes become
    ``live * share + (in_flight - 1) * saved * share`` with ``share = activation_factor * (1/pp)``.
    FLOPs stay the whole model's (the cost model divides them).
    """
    if tp == 1 and pp == 1 and in_flight == 1 and activation_factor == 1:
        return trace
    blocks = trace.units[1:]
    if pp > 1 and len(blocks) != n_layer:
        raise ValueError(f"pipeline parallelism needs the model's {n_layer} blocks as units; the trace found "
                         f"{len(blocks)}")
    kept_units = [0] + [1 + i for i in range(len(blocks) if pp == 1 else n_layer // pp)]
    unit_index = {u: k for k, u in enumerate(kept_units)}
    in_blocks = {i for b in blocks for i in b}
    kept_params = sorted({i for u in kept_units for i in trace.units[u]}
                         | {i for i in range(len(trace.params)) if i not in in_blocks})
    param_index = {i: k for k, i in enumerate(kept_params)}
    share = activation_factor / pp
    extra = (in_flight - 1) * trace.saved_bytes * share
    timeline = []
    for live, kind, arg in trace.timeline:
        if kind in (FWD_PRE, FWD_POST, BWD_PRE, BWD_POST):
            if arg not in unit_index:
                continue
            arg = unit_index[arg]
        elif kind == GRAD:
            if arg not in param_index:
                continue
            arg = param_index[arg]
        timeline.append((int(live * share + extra), kind, arg))
    return StepTrace(params=[_shard(trace.params[i], tp) for i in kept_params],
                     units=[[param_index[i] for i in trace.units[u]] for u in kept_units],
                     timeline=timeline, forward_flops=trace.forward_flops, backward_flops=trace.backward_flops,
                     known=trace.known)


def local_params(params: Sequence[ParamSpec]) -> int:
    return sum(p.numel for p in params)
