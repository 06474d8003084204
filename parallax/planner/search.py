"""``plan``: per-rank peak memory and modelled step time of every configuration; the fastest that fits."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from parallax.planner.cost import SCHEDULES, Hardware, step_time
from parallax.planner.device import device_memory_bytes
from parallax.planner.partition import (
    ModelDims,
    local_params,
    micro_batch_candidates,
    micro_batches_in_flight,
    model_dims,
    parse_degrees,
    pp_candidates,
    stage_trace,
    tp_activation_factor,
    tp_candidates,
)
from parallax.planner.states import BACKENDS, flat_buffers, simulate, state_bytes
from parallax.planner.trace import LossFn, StepTrace, synthetic_trace, trace_step
from parallax.planner.units import format_bytes, parse_bytes
from parallax.runtime_config import RuntimeConfig
from parallax.validate import positive_int

__all__ = ["Estimate", "Plan", "plan", "zero_formula_bytes", "PRECISIONS", "OFFLOADS", "STAGES", "TIE"]

STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOADS = ("none", "cpu")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Modelled times within this fraction of the fastest count as a tie; ties go to the simplest
# configuration (no offload, no checkpointing, the lowest stage, bf16 before fp16: fewer moving
# parts at the same speed), then to the lowest peak.
TIE = 0.01


@dataclass(frozen=True)
class Estimate:
    """One configuration: what a rank holds and how long a step takes (modelled)."""

    zero_stage: int
    precision: str
    offload: str
    checkpointing: str  # "none" or a px.checkpoint.activation policy ("block", "every_n:K")
    peak_bytes: int  # predicted highest device bytes of a rank during a step
    param_bytes: int  # device bytes between steps: parameters (stage 3: shards)
    grad_bytes: int  # ... gradients kept between steps (stage 1's full buffer)
    optimizer_bytes: int  # ... optimizer state (0 with offload)
    grads_after_backward: int  # gradients held when backward ends (stage 0-1 full, 2-3 shards)
    activation_bytes: int | None  # what the forward saves for backward (None: unknown)
    peak_activation_bytes: int | None  # activations live at the peak (transients of backward included)
    host_bytes: int  # offloaded optimizer state + staging in host memory
    formula_bytes: int  # the ZeRO paper's model-state formula for this row
    peak_phase: str  # forward, backward or step
    step_time_s: float  # modelled (see parallax.planner.cost); for ranking
    compute_s: float
    comm_s: float
    optimizer_s: float
    fits: bool
    bucket_mb: float = 25.0
    prefetch: int = 1
    tp: int = 1  # tensor-parallel degree
    pp: int = 1  # pipeline stages
    micro_batches: int = 1  # the per-replica batch is split into this many (pipeline / accumulation)
    dp: int = 1  # data-parallel degree: world / (tp pp), what ZeRO shards over
    schedule: str = "1f1b"  # pipeline schedule (pp > 1)
    bubble_s: float = 0.0  # modelled pipeline fill and drain (in step_time_s)

    @property
    def label(self) -> str:
        ckpt = "" if self.checkpointing == "none" else f" +ckpt({self.checkpointing})"
        off = " +offload" if self.offload == "cpu" else ""
        mesh = f" tp{self.tp} pp{self.pp} m{self.micro_batches}" if self.has_mesh else ""
        return f"stage {self.zero_stage} {self.precision}{off}{ckpt}{mesh}"

    @property
    def has_mesh(self) -> bool:
        """Whether this row uses tensor/pipeline parallelism or splits the batch into micro-batches."""
        return (self.tp, self.pp, self.micro_batches) != (1, 1, 1)

    @property
    def time_per_sequence_s(self) -> float:
        """Modelled seconds per sequence of the global batch (dp replicas step together): what
        ranks meshes with different data-parallel degrees."""
        return self.step_time_s / self.dp

    def runtime_config(self, **overrides: Any) -> RuntimeConfig:
        """The ``px.RuntimeConfig`` of this row (``overrides`` replace fields, e.g. ``timeout_s``)."""
        values = dict(zero_stage=self.zero_stage, precision=self.precision, offload=self.offload,
                      bucket_mb=self.bucket_mb, prefetch=self.prefetch,
                      activation_checkpointing=False if self.checkpointing == "none" else self.checkpointing)
        values.update(overrides)
        return RuntimeConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Plan:
    """Every configuration the planner considered, and the one it picks (``best``; None if none fits)."""

    estimates: tuple[Estimate, ...]
    best: Estimate | None
    model: str
    num_params: int
    world_size: int
    device_bytes: int
    usable_bytes: int  # device_bytes * (1 - margin): what a configuration must fit in
    seq_len: int | None
    micro_batch: int  # sequences per data-parallel replica and step
    activations_known: bool
    notes: tuple[str, ...] = ()

    def fitting(self) -> list[Estimate]:
        return [e for e in self.estimates if e.fits]

    def find(self, zero_stage: int, precision: str, offload: str = "none", checkpointing: str = "none", *,
             tp: int = 1, pp: int = 1, micro_batches: int = 1) -> Estimate:
        key = (zero_stage, precision, offload, checkpointing, tp, pp, micro_batches)
        for e in self.estimates:
            if (e.zero_stage, e.precision, e.offload, e.checkpointing, e.tp, e.pp, e.micro_batches) == key:
                return e
        raise KeyError(f"no estimate for stage {zero_stage} {precision}, offload {offload}, "
                       f"checkpointing {checkpointing}, tp {tp}, pp {pp}, micro_batches {micro_batches}")

    def table(self) -> str:
        """The table ``parallax plan`` prints: one row per configuration, the pick marked."""
        fastest = min((e.time_per_sequence_s for e in self.estimates), default=1.0)
        mesh = any(e.has_mesh for e in self.estimates)
        headers = (["tp", "pp", "m", "dp"] if mesh else []) + [
            "stage", "precision", "offload", "ckpt", "params", "grads", "optim", "activations",
            "peak/rank", "host/rank", "ZeRO formula", "fits", "step [rel]", ""]
        rows = []
        for e in self.estimates:
            rows.append(([str(e.tp), str(e.pp), str(e.micro_batches), str(e.dp)] if mesh else []) + [
                         str(e.zero_stage), e.precision, e.offload, e.checkpointing, format_bytes(e.param_bytes),
                         format_bytes(e.grads_after_backward), format_bytes(e.optimizer_bytes),
                         format_bytes(e.activation_bytes), format_bytes(e.peak_bytes),
                         format_bytes(e.host_bytes) if e.host_bytes else "-", format_bytes(e.formula_bytes),
                         "yes" if e.fits else "no", f"{e.time_per_sequence_s / fastest:.2f}",
                         "<- best" if e is self.best else ""])
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
        batch = f"micro-batch {self.micro_batch} x {self.seq_len} tokens" if self.seq_len else "activations unknown"
        lines = [f"{self.model}: {self.num_params / 1e6:,.1f}M parameters, {self.world_size} rank(s), "
                 f"{format_bytes(self.device_bytes)} per device (plans fit in {format_bytes(self.usable_bytes)}), "
                 + batch]
        lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
        lines.append("  ".join("-" * w for w in widths[:-1]))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if self.best is not None:
            lines.append(f"best: {self.best.label}: peak {format_bytes(self.best.peak_bytes)} per rank")
        else:
            lines.append(f"nothing fits in {format_bytes(self.usable_bytes)} per rank: more ranks, a smaller "
                         "micro-batch or sequence, or more device memory")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("estimates", "best")}
        out["estimates"] = [e.to_dict() for e in self.estimates]
        out["best"] = None if self.best is None else self.best.to_dict()
        return out


def zero_formula_bytes(stage: int, precision: str, offload: str, num_params: int, world_size: int) -> int:
    """The ZeRO paper's model states per rank: b Psi params, b Psi grads, K Psi optimizer state.

    b = 4 (fp32) or 2 (bf16/fp16); K = 8 (Adam m, v; fp32 parameters are their own master) or
    12 (fp32 master + m + v); divided by N from stage 3, 2 and 1 on respectively. With offload
    the optimizer state is on the host (0 here).
    """
    b = _DTYPES[precision].itemsize
    k = 0 if offload == "cpu" else (8 if b == 4 else 12)
    n = world_size
    return int(b * num_params / (n if stage >= 3 else 1) + b * num_params / (n if stage >= 2 else 1)
               + k * num_params / (n if stage >= 1 else 1))


# --------------------------------------------------------------------------------------------
# inputs


def _choices(name: str, values: Sequence[Any], allowed: Sequence[Any]) -> tuple:
    values = (values,) if isinstance(values, (str, int)) else tuple(values)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{name} must be a non-empty subset of {', '.join(map(str, allowed))}, got {values!r}")
    return tuple(v for v in allowed if v in values)


def _policies(values: Any) -> tuple[str, ...]:
    from parallax.checkpoint.activation import _parse_policy

    values = (values,) if isinstance(values, (str, bool)) else tuple(values)
    out: list[str] = []
    for v in values:
        policy = {False: "none", True: "block", "off": "none", "on": "block"}.get(v, v) \
            if isinstance(v, (str, bool)) else v
        if not isinstance(policy, str):
            raise ValueError(f"checkpointing: {v!r} is not a policy name; use 'none', 'block' or 'every_n:K'")
        if policy != "none":
            try:
                _parse_policy(policy)
            except ValueError as exc:
                raise ValueError(f"checkpointing: {exc}") from None
        if policy not in out:
            out.append(policy)
    if not out:
        raise ValueError("checkpointing must name at least one policy ('none', 'block', 'every_n:K')")
    return tuple(out)


def _resolve(model: Any) -> tuple[nn.Module | None, int, int | None, str]:
    """(module to trace or None, parameter count, default sequence length, a name)."""
    from parallax.models import ALL_PRESETS, GPTConfig, LlamaConfig, build_model, config_from_preset

    if isinstance(model, bool):
        raise ValueError(f"model_or_num_params must be a module, a model config, a preset name or a parameter "
                         f"count, got {model!r}")
    if isinstance(model, numbers.Integral):
        if model < 1:
            raise ValueError(f"model_or_num_params: a parameter count must be positive, got {model}")
        return None, int(model), None, "bare parameter count"
    if isinstance(model, float) and model.is_integer() and model >= 1:
        return None, int(model), None, "bare parameter count"
    if isinstance(model, str):
        if model not in ALL_PRESETS:
            raise ValueError(f"model_or_num_params: unknown preset {model!r}; known presets: {', '.join(ALL_PRESETS)}")
        model, name = config_from_preset(model), f"preset {model}"
    else:
        name = None
    if isinstance(model, (GPTConfig, LlamaConfig)):
        with torch.device("meta"):
            module = build_model(model)
        return module, sum(p.numel() for p in module.parameters()), model.block_size, name or type(module).__name__
    if isinstance(model, nn.Module):
        seq = getattr(getattr(model, "config", None), "block_size", None) or getattr(
            getattr(model, "config", None), "n_positions", None)
        return model, sum(p.numel() for p in model.parameters()), seq, type(model).__name__
    raise ValueError(f"model_or_num_params must be an nn.Module, a model config, a preset name or a parameter count, "
                     f"got {type(model).__name__}")


# --------------------------------------------------------------------------------------------
# the search


def plan(model_or_num_params: nn.Module | Any, world_size: int, device_bytes: int | float | str,
         seq_len: int | None = None, micro_batch: int = 1, *,
         stages: Sequence[int] = STAGES, precisions: Sequence[str] = PRECISIONS,
         offloads: Sequence[str] = OFFLOADS, checkpointing: Sequence[str] = ("none", "block"),
         bucket_mb: float = 25.0, prefetch: int = 1, backend: str = "nccl", margin: float = 0.10,
         hardware: Hardware | None = None, loss_fn: LossFn | None = None, layers: int | None = None,
         tp: int | Sequence[int] | str = 1, pp: int | Sequence[int] | str = 1,
         micro_batches: int | Sequence[int] | str = 1, schedule: str = "1f1b", virtual_stages: int = 1,
         sequence_parallel: bool = False) -> Plan:
    """Predict each rank's peak memory for every stage x precision x offload x checkpointing; pick the
    fastest configuration that fits.

    Args:
        model_or_num_params: an ``nn.Module`` (any device, meta included: nothing is run on it),
            a model config (``GPTConfig``, ``LlamaConfig``), a preset name of any family ("gpt2",
            "llama-3.2-1b", ...) or a parameter count.
            A module or config is traced: one forward + backward on fake tensors measures the
            activations, gradients and their timing exactly as the runtime would see them. A
            bare count has no activations (reported as unknown and left out of the peak) and no
            layer structure: it is taken as ``layers`` equal blocks (default 1, i.e. stage 3
            gathers it all at once, a pessimistic bound); only checkpointing "none" is planned.
        world_size: ranks (N = tp x pp x dp; data-parallel ranks when tp = pp = 1).
        device_bytes: memory of one device, bytes or a string ("16GB" = 16e9, "16GiB" = 16 * 2**30;
            see ``parallax.planner.units``), or "auto": this machine's (``device_memory_bytes``:
            the CUDA device's total memory, else physical RAM / ``LOCAL_WORLD_SIZE``).
        seq_len: tokens per sequence (default: the model's block_size / n_positions).
        micro_batch: sequences per data-parallel replica and step (per rank when tp = pp = 1); with
            ``micro_batches`` = m it is split into m micro-batches of micro_batch / m sequences.
        stages, precisions, offloads, checkpointing: the candidates (checkpointing: "none" and
            ``px.checkpoint.activation`` policies, e.g. "block", "every_n:2"). Offload needs
            stage >= 1 (stage 0 + offload is skipped).
        bucket_mb, prefetch: ``RuntimeConfig``'s, which fix the gradient buckets and the stage-3
            working set.
        backend: "nccl" (GPUs; collectives work in place) or "gloo" (CPU ranks: a reduce-scatter
            in flight holds a full-size copy of its input, an all-gather stages its output).
        margin: a configuration fits when its peak is at most ``device_bytes * (1 - margin)``;
            the margin covers what the model leaves out (CUDA context and NCCL buffers, the
            caching allocator's fragmentation and rounding, kernels' internal workspaces).
        hardware: rates of the step-time model (``parallax.planner.cost``).
        loss_fn: ``loss_fn(model, idx, targets) -> scalar loss`` for a module that is not a
            language model taking token ids (default ``parallax.planner.trace.default_loss``).
        layers: for a bare parameter count, how many equal blocks it is made of.
        tp, pp: tensor- and pipeline-parallel degrees: an int, a sequence of candidates or "auto"
            (every degree that divides the world size and, for tp, the heads and KV heads, for pp,
            the layers). Explicit degrees that do not divide them are an error. Needs a module or
            config (its heads, layers and width). Default 1: data parallelism only.
        micro_batches: how many micro-batches the per-replica batch is split into (an int, a
            sequence or "auto": 1 without a pipeline, else pp, 2 pp, 4 pp, ... dividing the batch).
        schedule: the pipeline schedule, "gpipe", "1f1b" or "interleaved" (with ``virtual_stages``
            model chunks per rank): it sets the activations in flight and the bubble.
        sequence_parallel: tensor parallelism with sequence parallelism (activations outside the
            tensor-parallel regions split too; pipeline sends 1/tp per rank).

    Meshes are compared by modelled time per sequence of the global batch (``dp`` replicas
    step together), so a mesh with fewer data-parallel replicas must step faster to win. The
    memory and time of tensor/pipeline parallelism: ``parallax.planner.partition`` and ``cost``.

    Returns a ``Plan``: ``plan.best`` is the fastest configuration expected to fit (``None`` if
    none does), ``plan.estimates`` every candidate, ``plan.table()`` the table.
    """
    module, num_params, default_seq, name = _resolve(model_or_num_params)
    world_size = positive_int("world_size", world_size)
    device_bytes = device_memory_bytes() if device_bytes == "auto" else parse_bytes(device_bytes, "device_bytes")
    micro_batch = positive_int("micro_batch", micro_batch)
    if seq_len is None:
        seq_len = default_seq
        if seq_len is None and module is not None:
            raise ValueError(f"seq_len is needed for a {type(module).__name__} (it has no config.block_size)")
    if seq_len is not None:
        seq_len = positive_int("seq_len", seq_len)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < 1:
        raise ValueError(f"margin must be a fraction in [0, 1), got {margin!r}")
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be a positive number, got {bucket_mb!r}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be a non-negative integer, got {prefetch!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if layers is not None:
        layers = positive_int("layers", layers)
    stages = _choices("stages", stages, STAGES)
    precisions = _choices("precisions", precisions, PRECISIONS)
    offloads = _choices("offloads", offloads, OFFLOADS)
    policies = _policies(checkpointing)
    hardware = hardware or Hardware()
    usable = int(device_bytes * (1 - margin))
    dims = model_dims(module) if module is not None else None
    meshes, mesh_notes = _meshes(world_size, dims, tp, pp, micro_batches, micro_batch, schedule, virtual_stages)

    notes: list[str] = list(mesh_notes)
    traces: dict[tuple[int, str, int], StepTrace] = {}
    batch_sizes = sorted({micro_batch // m for _, _, m in meshes})
    if module is None:
        if policies != ("none",):
            notes.append("a bare parameter count has no activations to checkpoint: only checkpointing 'none' planned")
        policies = ("none",)
        synthetic = synthetic_trace(num_params, layers or 1)
        for size in {_DTYPES[p].itemsize for p in precisions}:
            for batch in batch_sizes:
                traces[(size, "none", batch)] = synthetic
        notes.append("activations unknown (a bare parameter count): peaks are model states and gradient/communication "
                     "buffers only; pass a module or model config to include activations")
    else:
        skipped: dict[str, str] = {}
        for size in sorted({_DTYPES[p].itemsize for p in precisions}, reverse=True):
            dtype = torch.float32 if size == 4 else torch.bfloat16  # fp16 has bf16's sizes
            for policy, batch in ((p, b) for p in policies for b in batch_sizes):
                if policy in skipped:
                    continue
                try:
                    traces[(size, policy, batch)] = trace_step(module, batch, seq_len, dtype=dtype,
                                                               checkpointing=None if policy == "none" else policy,
                                                               loss_fn=loss_fn)
                except ValueError as exc:  # bad input (a sequence too long), or a policy without blocks
                    if policy == "none":
                        raise
                    skipped.setdefault(policy, str(exc))
                except Exception as exc:
                    raise RuntimeError(f"could not trace a training step of {name} on fake tensors "
                                       f"({type(exc).__name__}: {exc}); pass loss_fn(model, idx, targets) if "
                                       "its forward is not a language model's, or a parameter count") from exc
        notes += [f"checkpointing {policy!r} skipped: {why}" for policy, why in skipped.items()]
        policies = tuple(p for p in policies if p not in skipped)
    if 0 in stages and "cpu" in offloads:
        notes.append("offload 'cpu' needs stage >= 1: stage 0 + offload is not a configuration")
    if 3 in stages and any(p > 1 for _, p, _ in meshes):
        notes.append("ZeRO stage 3 is not combined with pipeline parallelism (pp > 1)")
    estimates = []
    for tp_degree, pp_degree, m in meshes:
        dp = world_size // (tp_degree * pp_degree)
        batch = micro_batch // m
        v = virtual_stages if schedule == "interleaved" else 1
        in_flight = micro_batches_in_flight(schedule, pp_degree, m, v)
        for stage in stages:
            for precision in precisions:
                b = _DTYPES[precision].itemsize
                for offload in offloads:
                    if (stage == 0 and offload == "cpu") or (stage == 3 and pp_degree > 1):
                        continue  # ZeRO-3 would re-gather a stage's parameters for every micro-batch
                    for policy in policies:
                        trace = traces[(b, policy, batch)]
                        if tp_degree * pp_degree * m > 1:
                            trace = stage_trace(trace, tp=tp_degree, pp=pp_degree, n_layer=dims.n_layer if dims else 1,
                                                activation_factor=tp_activation_factor(tp_degree, sequence_parallel),
                                                in_flight=in_flight)
                        estimates.append(_estimate(
                            trace, stage=stage, precision=precision, offload=offload, policy=policy, dp=dp,
                            tp=tp_degree, pp=pp_degree, micro_batches=m, schedule=schedule, virtual_stages=v,
                            tokens=batch * (seq_len or 0), num_params=num_params, dims=dims,
                            sequence_parallel=sequence_parallel, bucket_mb=bucket_mb, prefetch=prefetch,
                            backend=backend, hardware=hardware, usable=usable))
    return Plan(tuple(estimates), _pick(estimates), name, num_params, world_size, device_bytes, usable, seq_len,
                micro_batch, module is not None, tuple(notes))


def _estimate(trace: StepTrace, *, stage: int, precision: str, offload: str, policy: str, dp: int, tp: int, pp: int,
              micro_batches: int, schedule: str, virtual_stages: int, tokens: int, num_params: int,
              dims: ModelDims | None, sequence_parallel: bool, bucket_mb: float, prefetch: int, backend: str,
              hardware: Hardware, usable: int) -> Estimate:
    """One row: the stage's model states and peak on ``dp`` ZeRO ranks, and its modelled time."""
    b = _DTYPES[precision].itemsize
    buffers = flat_buffers(trace.params, trace.units, stage, dp, bucket_mb, _DTYPES[precision])
    states = state_bytes(trace.params, buffers, stage, dp, b, offload)
    peak = simulate(trace, buffers, states, stage, b, prefetch, world_size=dp, backend=backend)
    local = local_params(trace.params) if trace.known else num_params // (tp * pp)
    flops = trace.flops if trace.known else 6.0 * num_params * tokens
    t = step_time(flops=flops, num_params=local, world_size=dp, stage=stage, element_size=b, offload=offload,
                  hw=hardware, tp=tp, pp=pp, micro_batches=micro_batches, virtual_stages=virtual_stages,
                  tokens=tokens, hidden=dims.hidden if dims else 0, layers=dims.n_layer if dims else 0,
                  recompute=policy != "none", sequence_parallel=sequence_parallel)
    return Estimate(
        zero_stage=stage, precision=precision, offload=offload, checkpointing=policy,
        peak_bytes=peak.total, param_bytes=states.params, grad_bytes=states.grads,
        optimizer_bytes=states.optimizer, grads_after_backward=states.grads_after_backward,
        activation_bytes=trace.saved_bytes if trace.known else None,
        peak_activation_bytes=peak.activations if trace.known else None,
        host_bytes=states.host, formula_bytes=zero_formula_bytes(stage, precision, offload, local, dp),
        peak_phase=peak.phase, step_time_s=t.total_s, compute_s=t.compute_s, comm_s=t.comm_s,
        optimizer_s=t.optimizer_s, fits=peak.total <= usable, bucket_mb=bucket_mb, prefetch=prefetch,
        tp=tp, pp=pp, micro_batches=micro_batches, dp=dp, schedule=schedule, bubble_s=t.bubble_s)


def _meshes(world: int, dims: ModelDims | None, tp: Any, pp: Any, micro_batches: Any, batch: int, schedule: str,
            virtual_stages: int) -> tuple[list[tuple[int, int, int]], list[str]]:
    """The (tp, pp, micro-batches) candidates, and notes on what "auto" left out."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    virtual_stages = positive_int("virtual_stages", virtual_stages)
    if schedule == "interleaved" and virtual_stages < 2:
        raise ValueError(f"schedule 'interleaved' needs virtual_stages >= 2, got {virtual_stages}")
    tp_req, pp_req = parse_degrees("tp", tp), parse_degrees("pp", pp)
    mb_req = parse_degrees("micro_batches", micro_batches)
    notes: list[str] = []
    tps, why_tp = tp_candidates(tp_req, world, dims)
    pps, why_pp = pp_candidates(pp_req, world, dims)
    if schedule == "interleaved" and dims is not None:
        chunked = [p for p in pps if p == 1 or dims.n_layer % (p * virtual_stages) == 0]
        why_pp += [f"pp={p} x virtual_stages={virtual_stages} does not divide the {dims.n_layer} layers"
                   for p in pps if p not in chunked]
        pps = chunked
    for name, requested, why in (("tp", tp_req, why_tp), ("pp", pp_req, why_pp)):
        if why and requested != "auto":
            raise ValueError(f"{name}: {'; '.join(why)}")
    notes += [f"left out: {w}" for w in why_tp + why_pp if "does not divide the world" not in w]
    meshes = []
    for t in tps:
        for p in pps:
            if world % (t * p):
                continue
            counts = micro_batch_candidates(mb_req, batch, p)
            if schedule == "interleaved" and p > 1:
                counts = [m for m in counts if m % p == 0]
            if mb_req != "auto" and len(counts) < len(mb_req):
                raise ValueError(f"micro_batches: {', '.join(str(m) for m in mb_req if m not in counts)} does not "
                                 f"divide micro_batch={batch} (sequences per data-parallel replica)"
                                 + (f" or is not a multiple of pp={p} (interleaved)" if schedule == "interleaved"
                                    else ""))
            meshes += [(t, p, m) for m in counts]
    if not meshes:
        raise ValueError(f"no tensor x pipeline mesh fits: tp candidates {tps or tp_req}, pp candidates "
                         f"{pps or pp_req} on {world} ranks with micro_batch={batch}")
    return meshes, notes


def _simplicity(e: Estimate) -> tuple:
    return (e.offload != "none", e.checkpointing != "none", e.tp * e.pp, e.zero_stage,
            PRECISIONS.index(e.precision) == 2, e.micro_batches)


def _pick(estimates: list[Estimate]) -> Estimate | None:
    fits = [e for e in estimates if e.fits]
    if not fits:
        return None
    fastest = min(e.time_per_sequence_s for e in fits)
    ties = [e for e in fits if e.time_per_sequence_s <= fastest * (1 + TIE)
            or math.isclose(e.time_per_sequence_s, fastest)]
    return min(ties, key=lambda e: (_simplicity(e), e.peak_bytes))
