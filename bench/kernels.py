"""Fused kernels against the PyTorch composition (and Liger-Kernel): time and peak memory, forward and backward.

One small entry per case in ``CASES``: the ``px.ops`` function it measures, how to make its
inputs, the PyTorch composition it replaces and Liger-Kernel's counterpart. Providers, on the
same values (each on its own copy of the inputs):

* ``parallax``: ``px.ops.<op>`` as dispatched for the device (``backend`` column);
* ``torch``: the PyTorch composition the models would otherwise run; every ratio is against it;
* ``liger``: Liger-Kernel's functional op, on CUDA when ``liger_kernel`` imports (its kernels
  are GPU Triton kernels: on CPU it is reported as unavailable).

A case whose op is not in ``px.ops`` (yet) is skipped with a note, so the benchmark runs in a
tree that has only some of the fused ops.

Measured per provider:

* time (CUDA): ``fwd`` (a training forward: inputs require grad), ``bwd`` (``autograd.grad`` of
  a kept forward, retain_graph) and ``fwd+bwd``, interleaved round-robin (``bench.timing``),
  medians; ``vs torch`` = the provider's fwd+bwd median / torch's. On CPU the kernels do not run
  (the ops take their plain-PyTorch paths), so only memory is measured, except that ``--quick``
  also times its tiny shapes to keep every code path of this file alive (numbers that measure
  nothing);
* peak memory of one forward (``fwd peak``) and of one forward + backward (``f+b peak``): the
  highest bytes allocated during the call above what was allocated before it (the inputs), the
  outputs and gradients included. CUDA: ``torch.cuda.max_memory_allocated``. CPU:
  ``parallax.planner.CpuMemoryProfile``, which replays ``torch.profiler``'s memory events (every
  allocation and free of torch's CPU allocator made during the call, in order) to the exact
  peak; ``mem saved`` = torch's f+b peak / the provider's;
* ``max diff``: the largest difference of the provider's output and input gradients from torch's.

Weight-only quantized matmuls (``int8_linear``, ``int4_linear`` with group size 128): inference
forwards only (no_grad), at decode batches (1 and 16 rows) of a 4096 x 4096 weight, against
``F.linear`` on the bf16 weight (``torch``), L2 flushed before every call on CUDA (the weights
would otherwise stay in the cache between calls). ``vs torch`` is the time ratio as above;
``floor`` = bytes of the weight as stored (int4: packed codes, scales and zero points) / the
device-to-device copy bandwidth measured in the same process; ``max diff`` is against the op's
dequantize-then-``F.linear`` reference on the same stored weight. Goal (issue 14, the
``quant_goals`` note): at batch 1, int4 >= 2.5x and int8 >= 1.6x faster than bf16.

Batched multi-LoRA (``sgmv``, issue 17): inference forwards of the LoRA update alone for a batch
whose tokens are spread over 8 adapters (shuffled, as requests of different adapters are), at a
decode batch and a prefill chunk: ``parallax`` is ``px.ops.sgmv`` with its plan made once (as
the engine makes it once per step for every layer; on CPU the C++ kernel, lora_b N-contiguous as
the engine keeps it), ``torch`` the per-adapter gather-and-matmul loop (``sgmv_ref``), ``dense``
one adapter's two matmuls over every token (single-adapter LoRA, the cost floor: ``vs dense`` =
parallax's time / its). On CPU also the engine's torch paths without the kernel
(``parallax.inference.lora``): ``masked`` (every token through every slot's A, a mask, every
slot's B) and ``sorted`` (tokens sorted by slot once, two matmuls per slot, scattered back).

Goal (issue 10, reported in the ``goals`` note, not asserted): linear_cross_entropy at a 128k
vocabulary and 8k tokens uses >= 4x less peak memory than ``F.cross_entropy(lm_head(x))`` at
<= 1.1x its time on GPU; on CPU (memory only) the same vocabulary with fewer tokens, sized to
run in seconds on a small machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .table import Column
from .timing import CacheFlusher, interleave, synchronize

MB = 2**20
PROVIDERS = ("parallax", "torch", "liger")
MODES = ("fwd", "bwd", "fwd+bwd")
GOAL_MEMORY_X = 4.0
GOAL_TIME_X = 1.1
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

COLUMNS = [
    Column("case", "case"),
    Column("shape", "shape"),
    Column("dtype", "dtype"),
    Column("provider", "provider"),
    Column("backend", "backend"),
    Column("fwd_ms", "fwd [ms]", ".3f"),
    Column("bwd_ms", "bwd [ms]", ".3f"),
    Column("fwdbwd_ms", "f+b [ms]", ".3f"),
    Column("vs_torch", "vs torch [x]", ".2f"),
    Column("fwd_peak_mb", "fwd peak [MB]", ".1f"),
    Column("fwdbwd_peak_mb", "f+b peak [MB]", ".1f"),
    Column("mem_x", "mem saved [x]", ".2f"),
    Column("floor_ms", "floor [ms]", ".4f"),
    Column("max_diff", "max diff", ".1e"),
    Column("vs_dense", "vs dense [x]", ".2f"),
]
# weight-only quantized matmuls: name -> group size (None: int8 per channel); goals: speedup over bf16 at batch 1
QUANT_CASES = {"int8_linear": None, "int4_linear": 128}
QUANT_GOALS = {"int8_linear": 1.6, "int4_linear": 2.5}
SGMV_SHAPES = {"cuda": dict(batches=(64, 4096), hidden=4096, out=4096, rank=16, adapters=8),
               "cpu": dict(batches=(64, 1024), hidden=1024, out=1024, rank=16, adapters=8),
               "quick": dict(batches=(16,), hidden=32, out=48, rank=4, adapters=8)}
QUANT_SHAPES = {"cuda": dict(batches=(1, 16), hidden=4096, out=4096),
                "cpu": dict(batches=(1, 16), hidden=1024, out=1024),
                "quick": dict(batches=(1,), hidden=256, out=128)}

Tensor = torch.Tensor
Inputs = tuple[list[Tensor], dict[str, Any]]  # (tensors that get gradients, other arguments)


# --------------------------------------------------------------------------------------------
# the cases: inputs, the PyTorch composition, Liger-Kernel's function


@dataclass(frozen=True)
class Case:
    """One fused op: ``make(shape, device, dtype, gen)`` builds its inputs; ``parallax_fn``,
    ``torch_fn`` and ``liger_fn`` map (leaves, others) to the output (a tensor or a tuple, in one
    layout for all providers); ``liger_fn`` imports liger_kernel when called. ``shapes`` by
    setting ('cuda', 'cpu', 'quick'), ``dtypes`` by device type."""

    name: str
    op: str
    make: Callable[[dict, torch.device, torch.dtype, torch.Generator], Inputs]
    parallax_fn: Callable[[list[Tensor], dict], Any]
    torch_fn: Callable[[list[Tensor], dict], Any]
    liger_fn: Callable[[list[Tensor], dict], Any]
    shapes: dict[str, dict]
    dtypes: dict[str, str]


def _randn(shape, device, dtype, gen, scale=1.0) -> Tensor:
    return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)


def _lce_inputs(s, device, dtype, gen) -> Inputs:
    x = _randn((s["tokens"], s["hidden"]), device, dtype, gen)
    weight = _randn((s["vocab"], s["hidden"]), device, dtype, gen, scale=s["hidden"] ** -0.5)
    targets = torch.randint(0, s["vocab"], (s["tokens"],), generator=gen, device=device)
    return [x, weight], {"targets": targets}


def _liger_lce(leaves, o):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(*leaves, o["targets"])


def _rms_norm_inputs(s, device, dtype, gen) -> Inputs:
    x = _randn((s["tokens"], s["hidden"]), device, dtype, gen)
    weight = (1.0 + _randn((s["hidden"],), device, torch.float32, gen, scale=0.1)).to(dtype)
    return [x, weight], {"eps": 1e-6}


def _torch_rms_norm(leaves, o):
    """transformers' LlamaRMSNorm: normalise in fp32, round to the input dtype, then scale."""
    x, weight = leaves
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + o["eps"])
    return weight * h.to(x.dtype)


def _liger_rms_norm(leaves, o):
    from liger_kernel.transformers.functional import liger_rms_norm

    return liger_rms_norm(*leaves, o["eps"], in_place=False)


def _rotary_inputs(s, device, dtype, gen) -> Inputs:
    b, t, d = s["batch"], s["seq"], s["head_dim"]
    q = _randn((b, t, s["heads"], d), device, dtype, gen)
    k = _randn((b, t, s["kv_heads"], d), device, dtype, gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    angles = torch.arange(t, device=device, dtype=torch.float32)[:, None] * inv_freq  # (T, D/2)
    cos = angles.cos().expand(b, t, d // 2).contiguous()
    sin = angles.sin().expand(b, t, d // 2).contiguous()
    return [q, k], {"cos": cos, "sin": sin}


def _torch_rotary(leaves, o):
    """transformers' apply_rotary_pos_emb (rotate_half; cos/sin in the inputs' dtype) on (B, T, H, D)."""
    cos = torch.cat([o["cos"], o["cos"]], dim=-1)[:, :, None, :]  # (B, T, 1, D)
    sin = torch.cat([o["sin"], o["sin"]], dim=-1)[:, :, None, :]

    def rotate(x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)

    return tuple(rotate(t) for t in leaves)


def _liger_rotary(leaves, o):
    """Liger takes (B, H, T, D) views of (B, T, H, D) storage and half-width cos/sin with rotary_dim."""
    from liger_kernel.transformers.functional import liger_rope

    q, k = (t.transpose(1, 2) for t in leaves)
    q, k = liger_rope(q, k, o["cos"], o["sin"], rotary_dim=leaves[0].shape[-1])
    return q.transpose(1, 2), k.transpose(1, 2)


def _swiglu_inputs(s, device, dtype, gen) -> Inputs:
    return [_randn((s["tokens"], s["ffn"]), device, dtype, gen) for _ in range(2)], {}


def _liger_swiglu(leaves, o):
    from liger_kernel.transformers.functional import liger_swiglu

    return liger_swiglu(*leaves)


def _lora_inputs(s, device, dtype, gen) -> Inputs:
    """A frozen base linear layer (weight and bias not trained, as in PEFT) and a rank-r adapter
    with a non-zero B; the leaves are x, A and B."""
    hidden, out, r = s["hidden"], s["out"], s["rank"]
    x = _randn((s["tokens"], hidden), device, dtype, gen)
    lora_a = _randn((r, hidden), device, dtype, gen, scale=hidden ** -0.5)
    lora_b = _randn((out, r), device, dtype, gen, scale=r ** -0.5)
    weight = _randn((out, hidden), device, dtype, gen, scale=hidden ** -0.5)
    return [x, lora_a, lora_b], {"weight": weight, "bias": _randn((out,), device, dtype, gen), "scaling": 2.0}


def _torch_lora(leaves, o):
    """PEFT's lora.Linear forward (no dropout): ``base_layer(x) + lora_B(lora_A(x)) * scaling``."""
    x, lora_a, lora_b = leaves
    return F.linear(x, o["weight"], o["bias"]) + F.linear(F.linear(x, lora_a), lora_b) * o["scaling"]


def _no_liger_lora(leaves, o):
    raise NotImplementedError("Liger-Kernel has no LoRA op")


def _px(op: str) -> Callable[..., Any]:
    import parallax as px

    return getattr(px.ops, op)


CASES = [
    Case("linear_cross_entropy", "linear_cross_entropy", _lce_inputs,
         parallax_fn=lambda leaves, o: _px("linear_cross_entropy")(*leaves, o["targets"]),
         torch_fn=lambda leaves, o: F.cross_entropy(F.linear(*leaves).float(), o["targets"]),
         liger_fn=_liger_lce,
         # cpu: a 128k vocabulary with tokens / hidden as on the GPU (2), a few seconds per call
         shapes={"cuda": dict(tokens=8192, hidden=4096, vocab=128256),
                 "cpu": dict(tokens=512, hidden=256, vocab=128256),
                 "quick": dict(tokens=64, hidden=32, vocab=1000)},
         dtypes={"cuda": "bf16", "cpu": "fp32"}),
    Case("rms_norm", "rms_norm", _rms_norm_inputs,
         parallax_fn=lambda leaves, o: _px("rms_norm")(*leaves, o["eps"]),
         torch_fn=_torch_rms_norm, liger_fn=_liger_rms_norm,
         shapes={"cuda": dict(tokens=16384, hidden=4096), "cpu": dict(tokens=2048, hidden=1024),
                 "quick": dict(tokens=64, hidden=128)},
         dtypes={"cuda": "bf16", "cpu": "fp32"}),
    Case("rotary_embedding", "rotary_embedding", _rotary_inputs,
         parallax_fn=lambda leaves, o: tuple(_px("rotary_embedding")(*leaves, o["cos"], o["sin"])),
         torch_fn=_torch_rotary, liger_fn=_liger_rotary,
         shapes={"cuda": dict(batch=4, seq=4096, heads=32, kv_heads=8, head_dim=128),
                 "cpu": dict(batch=1, seq=512, heads=8, kv_heads=2, head_dim=64),
                 "quick": dict(batch=1, seq=16, heads=4, kv_heads=2, head_dim=16)},
         dtypes={"cuda": "bf16", "cpu": "fp32"}),
    Case("swiglu", "swiglu", _swiglu_inputs,
         parallax_fn=lambda leaves, o: _px("swiglu")(*leaves),
         torch_fn=lambda leaves, o: F.silu(leaves[0]) * leaves[1], liger_fn=_liger_swiglu,
         shapes={"cuda": dict(tokens=16384, ffn=14336), "cpu": dict(tokens=1024, ffn=2048),
                 "quick": dict(tokens=32, ffn=64)},
         dtypes={"cuda": "bf16", "cpu": "fp32"}),
    Case("lora_linear", "lora_linear", _lora_inputs,
         parallax_fn=lambda leaves, o: _px("lora_linear")(leaves[0], o["weight"], o["bias"], *leaves[1:],
                                                          o["scaling"]),
         torch_fn=_torch_lora, liger_fn=_no_liger_lora,
         shapes={"cuda": dict(tokens=8192, hidden=4096, out=4096, rank=16),
                 "cpu": dict(tokens=512, hidden=1024, out=1024, rank=16),
                 "quick": dict(tokens=16, hidden=32, out=48, rank=4)},
         dtypes={"cuda": "bf16", "cpu": "fp32"}),
]


def _shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


# --------------------------------------------------------------------------------------------
# measuring one provider


def _as_tuple(out: Any) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class _Provider:
    """One provider's leaves (its own copies, requiring grad), the output gradients and its calls;
    ``kept`` (set for timing) is a forward whose graph ``bwd`` reuses."""

    def __init__(self, fn: Callable, leaves: list[Tensor], others: dict) -> None:
        self.fn, self.others = fn, others
        self.leaves = [t.detach().clone().requires_grad_() for t in leaves]
        self.grad_outs: tuple[Tensor, ...] = ()
        self.kept: tuple[Tensor, ...] = ()

    def fwd(self) -> tuple[Tensor, ...]:
        return _as_tuple(self.fn(self.leaves, self.others))

    def bwd(self) -> tuple[Tensor, ...]:
        return torch.autograd.grad(self.kept, self.leaves, self.grad_outs, retain_graph=True)

    def fwd_bwd(self) -> tuple[Tensor, ...]:
        """The outputs and the gradients of every leaf."""
        out = self.fwd()
        return tuple(o.detach() for o in out) + torch.autograd.grad(out, self.leaves, self.grad_outs)


def _output_grads(outputs: tuple[Tensor, ...], gen: torch.Generator) -> tuple[Tensor, ...]:
    """1 for a loss (as loss.backward() passes), a random gradient for other outputs."""
    return tuple(torch.ones_like(o) if o.dim() == 0 else
                 torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype) for o in outputs)


def _peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """(highest bytes allocated while ``fn`` runs above what was allocated before, its result);
    see the module doc for how."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    from parallax.planner import CpuMemoryProfile

    prof = CpuMemoryProfile()
    with prof:
        result = fn()
    return prof.peak()[0], result


def _max_diff(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want) if a.numel())


# --------------------------------------------------------------------------------------------
# the benchmark


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    names = ",".join([c.name for c in CASES] + list(QUANT_CASES) + ["sgmv"])
    parser.add_argument("--cases", default=names, help=f"comma-separated subset of {names}")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"subset of {','.join(PROVIDERS)} "
                                                                         "(torch, the baseline, always runs)")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timed rounds per case and mode (CUDA)")


def _liger_problem(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs CUDA (Liger-Kernel's ops are GPU Triton kernels)"
    try:
        import liger_kernel  # noqa: F401
    except ImportError as exc:
        return f"liger_kernel is not installed (pip install liger-kernel, in the bench extra): {exc}"
    return None


def _backend_name(op: str, device: torch.device) -> str | None:
    from parallax import ops

    try:
        name = ops.backend(op, device)
    except ValueError:  # an op without a backend entry
        return None
    return f"{name} (interpreted)" if name == "triton" and device.type == "cpu" else name


def _selected(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in chosen if p not in allowed]
    if bad:
        raise ValueError(f"--{what}: unknown {bad}; allowed: {', '.join(allowed)}")
    return chosen


def run(ctx) -> Iterator[dict]:
    import parallax as px

    device, args = ctx.device, ctx.args
    cases = _selected(args.cases, tuple(c.name for c in CASES) + tuple(QUANT_CASES) + ("sgmv",), "cases")
    providers = ["torch"] + [p for p in _selected(args.providers, PROVIDERS, "providers") if p != "torch"]
    liger_problem = _liger_problem(device)
    if "liger" in providers and liger_problem:
        providers.remove("liger")
        ctx.skip("liger", liger_problem)
    elif "liger" in providers:
        import importlib.metadata

        ctx.add_version("liger-kernel", importlib.metadata.version("liger-kernel"))
    timed = device.type == "cuda" or ctx.quick
    setting = "quick" if ctx.quick else device.type
    ctx.note("memory", "peak bytes allocated during the call above those allocated before it (inputs excluded, "
                       "outputs and gradients included): " + ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                                                               else "parallax.planner.CpuMemoryProfile (torch.profiler "
                                                                    "memory events of the CPU allocator, replayed)"))
    if not timed:
        ctx.note("time", "not measured on CPU (the fused kernels run on GPUs; on CPU the ops take their "
                         "plain-PyTorch paths): memory only")
    elif device.type == "cpu":
        ctx.note("time", "--quick on CPU: tiny shapes that keep every code path alive; the times measure nothing")
    runnable = []
    for case in CASES:  # skips noted before the first row, so that every record carries them
        if case.name not in cases:
            continue
        if hasattr(px.ops, case.op):
            runnable.append(case)
        else:
            ctx.skip(case.name, f"px.ops.{case.op} does not exist in this tree (not merged yet)")
    for case in runnable:
        rows = list(_measure_case(ctx, case, providers, setting, timed))
        if case.name == "linear_cross_entropy" and not ctx.quick:
            ctx.note("goals", _lce_goal(rows, device))
        yield from rows
    quant = [name for name in QUANT_CASES if name in cases]
    if quant:
        rows = list(_measure_quant(ctx, quant, setting, timed))
        if device.type == "cuda" and not ctx.quick:
            ctx.note("quant_goals", _quant_goals(rows))
        yield from rows
    if "sgmv" in cases:
        yield from _measure_sgmv(ctx, setting, timed)


def _measure_case(ctx, case: Case, providers: list[str], setting: str, timed: bool) -> Iterator[dict]:
    device = ctx.device
    shape = case.shapes[setting]
    dtype_name = case.dtypes[device.type]
    gen = torch.Generator(device=device).manual_seed(0)
    leaves, others = case.make(shape, device, DTYPES[dtype_name], gen)
    ctx.log(f"{case.name}: {_shape_text(shape)} {dtype_name}: {', '.join(providers)}")

    made: dict[str, _Provider] = {}
    peaks: dict[str, tuple[int, int]] = {}
    results: dict[str, tuple[Tensor, ...]] = {}
    grad_outs = None
    for name in providers:  # torch first: its outputs fix the output gradients every provider gets
        provider = _Provider(getattr(case, f"{name}_fn"), leaves, others)
        try:
            fwd_peak, outputs = _peak_bytes(provider.fwd, device)
            provider.grad_outs = grad_outs = grad_outs or _output_grads(outputs, gen)
            del outputs
            fwd_bwd_peak, outputs_and_grads = _peak_bytes(provider.fwd_bwd, device)
            if timed:
                provider.kept = provider.fwd()
        except Exception as exc:  # a provider that cannot run this case here: noted, the others go on
            if name == "torch":
                raise
            ctx.skip(f"{name} on {case.name}", f"{type(exc).__name__}: {str(exc)[:200]}")
            continue
        made[name], peaks[name], results[name] = provider, (fwd_peak, fwd_bwd_peak), outputs_and_grads
    diffs = {name: _max_diff(got, results["torch"]) for name, got in results.items()}
    timings = {}
    if timed:
        on_cpu = device.type == "cpu"
        for mode, method in zip(MODES, ("fwd", "bwd", "fwd_bwd")):
            timings[mode] = interleave({name: getattr(p, method) for name, p in made.items()}, device=device,
                                       warmup=1 if on_cpu else 3, budget_s=0.02 if on_cpu else ctx.args.budget,
                                       min_repeat=3 if on_cpu else 5, max_repeat=100)

    for name in made:
        row = {"case": case.name, "shape": _shape_text(shape), "dtype": dtype_name, "provider": name,
               "backend": _backend_name(case.op, device) if name == "parallax" else None, **shape,
               "fwd_peak_mb": peaks[name][0] / MB, "fwdbwd_peak_mb": peaks[name][1] / MB,
               "fwdbwd_peak_bytes": peaks[name][1], "mem_x": peaks["torch"][1] / max(peaks[name][1], 1),
               "max_diff": diffs[name]}
        for mode, key in zip(MODES, ("fwd", "bwd", "fwdbwd")):
            if timings:
                t = timings[mode][name]
                row.update({f"{key}_ms": t.median_ms, f"{key}_p20_ms": t.p20_ms, f"{key}_p80_ms": t.p80_ms})
        if timings:
            row["vs_torch"] = timings["fwd+bwd"][name].median_s / timings["fwd+bwd"]["torch"].median_s
        yield row
    del made, leaves, others, results
    gc.collect()
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()


def _lce_goal(rows: list[dict], device: torch.device) -> dict[str, str]:
    """The issue's goal for parallax's row: memory (and on CUDA time) against torch's."""
    row = next((r for r in rows if r["provider"] == "parallax"), None)
    if row is None:
        return {}
    setting = f"vocab {row['vocab']}, {row['tokens']} tokens, hidden {row['hidden']}, {row['dtype']}"
    if device.type == "cuda":
        ok = row["mem_x"] >= GOAL_MEMORY_X and row["vs_torch"] <= GOAL_TIME_X
        text = f"{row['mem_x']:.2f}x less peak memory at {row['vs_torch']:.2f}x the time"
        goal = f">= {GOAL_MEMORY_X:g}x less peak memory at <= {GOAL_TIME_X}x time"
    else:
        ok = row["mem_x"] >= GOAL_MEMORY_X
        text = f"{row['mem_x']:.2f}x less peak memory (time not measured on CPU)"
        goal = f">= {GOAL_MEMORY_X:g}x less peak memory"
    return {f"linear_cross_entropy ({setting}): {goal} than F.cross_entropy(lm_head(x))":
            f"{text}, {'met' if ok else 'NOT met'}"}


# --------------------------------------------------------------------------------------------
# weight-only quantized matmuls (inference forwards)


def _quantized(name: str, weight: Tensor) -> tuple[dict, int]:
    """The stored form of ``weight`` (round-to-nearest; the values do not matter for speed) as
    keyword arguments of ``px.ops.<name>``, and its bytes."""
    from parallax.ops.quant_linear import pack_int4

    w = weight.float()
    group_size = QUANT_CASES[name]
    if group_size is None:
        scales = w.abs().amax(1).clamp_min(1e-8) / 127
        stored = dict(qweight=torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales=scales)
    else:
        groups = w.view(w.shape[0], -1, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scales = (high - low).clamp_min(1e-8) / 15
        zeros = torch.round(-low / scales)
        codes = torch.round(groups / scales[..., None] + zeros[..., None]).clamp(0, 15).view_as(w)
        stored = dict(qweight=pack_int4(codes), scales=scales, zeros=zeros, group_size=group_size)
    return stored, sum(t.numel() * t.element_size() for t in stored.values() if isinstance(t, Tensor))


def _measure_quant(ctx, names: list[str], setting: str, timed: bool) -> Iterator[dict]:
    """Per quantized op and batch: the op and bf16 ``F.linear``, forward only, interleaved."""
    import parallax as px

    device, shape = ctx.device, QUANT_SHAPES[setting]
    dtype_name = "bf16" if device.type == "cuda" else "fp32"
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    weight = _randn((shape["out"], shape["hidden"]), device, dtype, gen, scale=shape["hidden"] ** -0.5)
    on_gpu = device.type == "cuda"
    flush = CacheFlusher(device) if on_gpu else None
    copy_bw = None
    if timed:
        from .paged_attention import _copy_bandwidth

        copy_bw = _copy_bandwidth(device, 256 if on_gpu else 16, flush)
        ctx.note("copy_bandwidth", f"{copy_bw / 1e9:.0f} GB/s (device-to-device copy, read + write bytes): the floor")
    stored = {name: _quantized(name, weight) for name in names}
    for batch in shape["batches"]:
        x = _randn((batch, shape["hidden"]), device, dtype, gen)
        fns = {"torch": lambda: F.linear(x, weight)}
        fns.update({name: (lambda op=getattr(px.ops, name), kw=stored[name][0]: op(x, **kw)) for name in names})
        with torch.no_grad():
            diffs = {"torch": 0.0, **{name: _max_diff((fns[name](),), (_quant_reference(name, x, stored[name][0]),))
                                      for name in names}}
            timings = interleave(fns, device=device, warmup=1 if not on_gpu else 5, flush=flush,
                                 budget_s=ctx.args.budget if on_gpu else 0.02, min_repeat=3 if not on_gpu else 20,
                                 max_repeat=200) if timed else {}
        for name in names:  # each op's rows: bf16 F.linear and the op, as the other cases' torch and parallax
            for provider, key in (("torch", "torch"), ("parallax", name)):
                weight_bytes = weight.numel() * weight.element_size() if key == "torch" else stored[name][1]
                row = {"case": name, "shape": f"batch={batch} hidden={shape['hidden']} out={shape['out']}",
                       "dtype": dtype_name, "provider": provider,
                       "backend": _backend_name(name, device) if key == name else None, "batch": batch,
                       "weight_bytes": weight_bytes, "max_diff": diffs[key]}
                if timings:
                    t = timings[key]
                    row.update(fwd_ms=t.median_ms, fwd_p20_ms=t.p20_ms, fwd_p80_ms=t.p80_ms,
                               vs_torch=t.median_s / timings["torch"].median_s, floor_ms=1e3 * weight_bytes / copy_bw)
                yield row
    del stored
    gc.collect()


def _quant_reference(name: str, x: Tensor, stored: dict) -> Tensor:
    """The op's plain-PyTorch reference (dequantize, then ``F.linear``) on the same stored weight."""
    from parallax.ops import quant_linear

    return getattr(quant_linear, f"{name}_ref")(x, **stored)


def _quant_goals(rows: list[dict]) -> dict[str, str]:
    """The issue's GPU goals: speedup of each quantized op over bf16 ``F.linear`` at batch 1."""
    goals = {}
    for row in rows:
        if row["provider"] != "parallax" or row["batch"] != 1 or row.get("vs_torch") is None:
            continue
        want, speedup = QUANT_GOALS[row["case"]], 1 / row["vs_torch"]
        goals[f"{row['case']} at batch 1 ({row['shape']}): >= {want}x faster than bf16 F.linear"] = (
            f"{speedup:.2f}x, {'met' if speedup >= want else 'NOT met'}")
    return goals


# --------------------------------------------------------------------------------------------
# batched multi-LoRA (inference forwards)


def _measure_sgmv(ctx, setting: str, timed: bool) -> Iterator[dict]:
    """Per batch: ``px.ops.sgmv`` over 8 adapters, ``sgmv_ref``, one dense adapter and (CPU) the
    engine's masked and sorted torch paths, forward only."""
    from parallax.ops.sgmv import sgmv, sgmv_plan, sgmv_ref

    device, shape = ctx.device, SGMV_SHAPES[setting]
    dtype_name = "bf16" if device.type == "cuda" else "fp32"
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden, out, r, slots = shape["hidden"], shape["out"], shape["rank"], shape["adapters"]
    lora_a = _randn((slots, r, hidden), device, dtype, gen, scale=hidden ** -0.5)
    lora_b = _randn((slots, out, r), device, dtype, gen, scale=r ** -0.5)
    scaling = torch.full((slots,), 2.0, device=device)
    on_gpu = device.type == "cuda"
    if not on_gpu and not ctx.quick and _backend_name("sgmv", device) == "cpu":
        timed = True  # the C++ kernel runs on CPU: the engine's CPU path, worth timing
        ctx.note("sgmv_time", "timed on CPU too (px.ops.sgmv's C++ kernel): median of interleaved rounds")
    # the engine's layout on CPU: a contiguous (S, R, N) viewed as (S, N, R)
    b_fast = lora_b if on_gpu else lora_b.transpose(1, 2).contiguous().transpose(1, 2)
    b_rows = b_fast.transpose(1, 2).reshape(slots * r, out)  # (S * R, N), a view on CPU
    for batch in shape["batches"]:
        x = _randn((batch, hidden), device, dtype, gen)
        order = torch.randperm(batch, generator=torch.Generator().manual_seed(batch)).to(device)
        indices = order % slots  # every adapter, tokens shuffled
        plan = sgmv_plan(indices, slots)
        own = (indices[:, None] == torch.arange(slots, device=device)[None, :]).to(dtype)
        sort = torch.argsort(indices, stable=True)
        runs = torch.bincount(indices, minlength=slots).cumsum(0).tolist()

        def masked():  # parallax.inference.lora's TokenRouting._masked (the slot mask made once per step)
            u = (x @ lora_a.view(slots * r, hidden).T).view(-1, slots, r) * (own * scaling)[:, :, None]
            return u.view(-1, slots * r) @ b_rows

        def sorted_():  # TokenRouting._sorted (the order made once per step)
            xs, ys = x.index_select(0, sort), torch.empty(batch, out, dtype=dtype, device=device)
            for slot, (start, end) in enumerate(zip([0] + runs[:-1], runs)):
                torch.mm((xs[start:end] @ lora_a[slot].T) * scaling[slot], b_fast[slot].T, out=ys[start:end])
            return torch.zeros_like(ys).index_copy_(0, sort, ys)

        fns = {"parallax": lambda: sgmv(x, lora_a, b_fast, indices, scaling, plan=plan),
               "torch": lambda: sgmv_ref(x, lora_a, lora_b, indices, scaling),
               "dense": lambda: F.linear(F.linear(x, lora_a[0]), lora_b[0]) * 2.0}
        if not on_gpu:
            fns.update(masked=masked, sorted=sorted_)
        with torch.no_grad():
            want = fns["torch"]()
            diffs = {p: None if p == "dense" else 0.0 if p == "torch" else _max_diff((fn(),), (want,))
                     for p, fn in fns.items()}
            quick = ctx.quick and not on_gpu
            timings = interleave(fns, device=device, warmup=1 if quick else 5, budget_s=0.02 if quick else
                                 ctx.args.budget, min_repeat=3 if quick else 20, max_repeat=200) if timed else {}
        for provider in fns:
            row = {"case": "sgmv", "shape": f"tokens={batch} hidden={hidden} out={out} rank={r} adapters={slots}",
                   "dtype": dtype_name, "provider": provider,
                   "backend": _backend_name("sgmv", device) if provider == "parallax" else None, "tokens": batch,
                   "max_diff": diffs[provider]}
            if timings:
                t = timings[provider]
                row.update(fwd_ms=t.median_ms, fwd_p20_ms=t.p20_ms, fwd_p80_ms=t.p80_ms,
                           vs_torch=t.median_s / timings["torch"].median_s,
                           vs_dense=t.median_s / timings["dense"].median_s)
            yield row
