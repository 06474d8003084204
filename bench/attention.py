"""FlashAttention forward/backward: parallax's Triton kernels against PyTorch SDPA (flash, math).

FLOPs are counted as FlashAttention's own benchmark counts them: the forward pass does two
matmuls of 2*B*H*S^2*D each, 4*B*H*S^2*D, halved when causal (half of the score matrix is
masked); the backward pass counts as 2.5x the forward (five matmuls instead of two), so
forward+backward is 3.5x. TFLOP/s is that count over the median time; ``of mm`` divides it
by a bf16 matmul rate measured in the same process (an 8192^3 ``torch.mm``), the device's
practical tensor-core peak.

Settings (FlashAttention's): bf16, batch * seqlen = 16k tokens, hidden size 2048 (H = 2048 / D
heads, MHA), seqlens 512 to 16k, head dims 64 and 128, causal and non-causal. Providers, on
the same values, each in its native layout:

* ``parallax``: ``px.ops.flash_attention`` on (B, S, H, D), autotuned (the first call of each
  (head dim, causal) pair tunes, on the longest seqlen of the run; ``--no-autotune`` uses the
  default configurations);
* ``sdpa-flash``: ``F.scaled_dot_product_attention`` on (B, H, S, D) restricted to its flash
  backend (``torch.nn.attention.sdpa_kernel``);
* ``sdpa-math``: the same restricted to the math path (materialised scores, upcast to fp32),
  run only while its score matrix has at most ``--math-max-elements`` elements.

Modes: ``fwd`` (a training forward: inputs require grad, so the kernels save what the
backward needs), ``bwd`` (``torch.autograd.grad`` of a kept forward, retain_graph) and
``fwd+bwd``. The providers are timed interleaved (``bench.timing``), medians reported.
``max diff`` is the largest difference of the forward output from sdpa-flash's (or sdpa-math's
where flash cannot run): a provider that is fast because it is wrong shows there.

Goals (issue 5, reported, not asserted): forward >= 1.0x sdpa-flash and forward+backward
>= 0.8x; forward >= 50% of the matmul rate at seqlens of 8k and more.

On CPU there is nothing to measure: the benchmark says so, or with ``--quick`` runs one tiny
fp32 case of every code path (the kernels interpreted when TRITON_INTERPRET=1, else the
plain-PyTorch reference), which keeps this file from rotting between GPU runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .table import Column
from .timing import interleave, synchronize

PROVIDERS = ("parallax", "sdpa-flash", "sdpa-math")
MODES = ("fwd", "bwd", "fwd+bwd")
BWD_FACTOR = 2.5  # backward FLOPs per forward FLOP (FlashAttention's count)
GOALS = {"fwd_vs_flash": 1.0, "fwdbwd_vs_flash": 0.8, "fwd_of_mm_at_8k": 0.5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

COLUMNS = [
    Column("seqlen", "seqlen", "d"),
    Column("batch", "batch", "d"),
    Column("head_dim", "D", "d"),
    Column("causal", "causal"),
    Column("provider", "provider"),
    Column("fwd_ms", "fwd [ms]", ".3f"),
    Column("bwd_ms", "bwd [ms]", ".3f"),
    Column("fwdbwd_ms", "f+b [ms]", ".3f"),
    Column("fwd_tflops", "fwd [TFLOP/s]", ".1f"),
    Column("bwd_tflops", "bwd [TFLOP/s]", ".1f"),
    Column("fwdbwd_tflops", "f+b [TFLOP/s]", ".1f"),
    Column("fwd_of_mm", "fwd of mm", ".2f"),
    Column("fwdbwd_of_mm", "f+b of mm", ".2f"),
    Column("fwd_vs_flash", "fwd vs flash [x]", ".2f"),
    Column("fwdbwd_vs_flash", "f+b vs flash [x]", ".2f"),
    Column("max_diff", "max diff", ".1e"),
]


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--seqlens", default=None,
                        help="sequence lengths (default 512,1024,2048,4096,8192,16384; --quick on CUDA: 1024,8192)")
    parser.add_argument("--head-dims", default="64,128", help="head dims (default 64,128)")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both", help="masks to run (default both)")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seqlen (default 16384)")
    parser.add_argument("--dim", type=int, default=2048, help="hidden size: heads = dim / head_dim (default 2048)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="default bf16 (fp32 on CPU)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"subset of {','.join(PROVIDERS)}")
    parser.add_argument("--budget", type=float, default=0.25, help="seconds of timed rounds per case and mode")
    parser.add_argument("--math-max-elements", type=float, default=2**30,
                        help="largest score matrix B*H*S*S sdpa-math runs on (default 2^30: 4 GiB in fp32)")
    parser.add_argument("--no-autotune", action="store_true",
                        help="parallax: the default kernel configurations (PARALLAX_FLASH_AUTOTUNE=0)")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def attention_flops(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, mode: str) -> float:
    """FlashAttention's FLOP count: 4*B*H*S^2*D forward (halved if causal), backward 2.5x that."""
    fwd = 4.0 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
    return {"fwd": fwd, "bwd": BWD_FACTOR * fwd, "fwd+bwd": (1 + BWD_FACTOR) * fwd}[mode]


def _matmul_rate(device: torch.device, dtype: torch.dtype, n: int, budget_s: float) -> float:
    """FLOP/s of an n x n x n ``torch.mm`` in ``dtype`` (median of repeats)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t = interleave({"mm": lambda: torch.mm(a, b, out=c)}, device=device, warmup=3, budget_s=budget_s,
                   min_repeat=5, max_repeat=50)["mm"]
    return 2.0 * n**3 / t.median_s


def _sdpa(backend) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def attend(q, k, v, causal: bool) -> torch.Tensor:  # (B, H, S, D)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attend


def _parallax(q, k, v, causal: bool) -> torch.Tensor:  # (B, S, H, D)
    from parallax.ops import flash_attention

    return flash_attention(q, k, v, causal=causal)


class _Case:
    """Inputs of one provider (leaves requiring grad, the output gradient) and its three timed calls."""

    def __init__(self, fn: Callable, q, k, v, do, causal: bool) -> None:
        self.leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        self.do = do
        self.fn = fn
        self.causal = causal
        self.kept = fn(*self.leaves, causal)  # the forward whose graph ``bwd`` reuses

    def fwd(self) -> torch.Tensor:
        return self.fn(*self.leaves, self.causal)

    def bwd(self) -> None:
        torch.autograd.grad(self.kept, self.leaves, self.do, retain_graph=True)

    def fwd_bwd(self) -> None:
        torch.autograd.grad(self.fn(*self.leaves, self.causal), self.leaves, self.do)


def _providers(wanted: list[str]) -> dict[str, tuple[Callable, str]]:
    """name -> (attention function, layout 'bshd' or 'bhsd') for the providers that run here."""
    from torch.nn.attention import SDPBackend

    found = {}
    for name in wanted:
        if name == "parallax":
            found[name] = (_parallax, "bshd")
        elif name == "sdpa-flash":
            found[name] = (_sdpa(SDPBackend.FLASH_ATTENTION), "bhsd")
        else:
            found[name] = (_sdpa(SDPBackend.MATH), "bhsd")
    return found


def _parallax_backend(device: torch.device) -> str:
    from parallax import ops

    name = ops.backend("flash_attention", device)
    if name == "triton" and device.type == "cpu":
        return "triton (interpreted: TRITON_INTERPRET=1)"
    return name


def run(ctx) -> Iterator[dict]:
    device, args = ctx.device, ctx.args
    if device.type != "cuda" and not ctx.quick:
        ctx.skip("attention", "needs a CUDA GPU (attention is compute-bound work for tensor cores; on CPU, "
                              "--quick runs one tiny case of every code path and measures nothing)")
        return
    wanted = [p.strip() for p in args.providers.split(",") if p.strip()]
    bad = [p for p in wanted if p not in PROVIDERS]
    if bad:
        raise ValueError(f"--providers: unknown {bad}; allowed: {', '.join(PROVIDERS)}")
    if args.no_autotune:
        os.environ["PARALLAX_FLASH_AUTOTUNE"] = "0"  # read by the launcher on every call

    on_cpu = device.type == "cpu"
    if on_cpu:  # smoke run: tiny, fp32 (the interpreter's bf16 tl.dot is broken), nothing measured
        seqlens, head_dims, tokens, dim = [64], [32], 128, 64
        dtype_name = "fp32" if args.dtype == "bf16" else args.dtype
        budget, mm_n = 0.02, 256
    else:
        seqlens = _ints(args.seqlens or ("1024,8192" if ctx.quick else "512,1024,2048,4096,8192,16384"))
        head_dims, tokens, dim = _ints(args.head_dims), args.tokens, args.dim
        dtype_name, budget, mm_n = args.dtype, args.budget, 8192
    dtype = DTYPES[dtype_name]
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    bad_dims = [d for d in head_dims if dim % d]
    if bad_dims:
        raise ValueError(f"--head-dims: {bad_dims} do not divide --dim {dim}")

    mm = _matmul_rate(device, dtype, mm_n, 0.2 if on_cpu else 1.0)
    ctx.note("matmul", f"{mm / 1e12:.1f} TFLOP/s ({mm_n}^3 torch.mm in {dtype_name}, median)")
    ctx.note("flops", "4*B*H*S^2*D forward (halved if causal), backward 2.5x forward (FlashAttention's count)")
    ctx.note("parallax_backend", _parallax_backend(device))
    ctx.note("setting", f"{dtype_name}, batch*seqlen = {tokens} tokens, hidden {dim} (H = {dim}/D, MHA)")
    ctx.note("goals", "fwd >= 1.0x sdpa-flash, fwd+bwd >= 0.8x; fwd >= 50% of the matmul rate at seqlen >= 8k "
                      "(reported, not asserted)")
    if on_cpu:
        ctx.note("cpu", "a smoke run of the code paths on CPU: the numbers measure nothing")
    providers = _providers(wanted)
    gen = torch.Generator(device=device).manual_seed(0)

    for head_dim in head_dims:
        heads = dim // head_dim
        for causal in causals:
            if "parallax" in providers and not on_cpu:
                _tune(ctx, max(seqlens), tokens, heads, head_dim, causal, dtype, device, gen)
            for seqlen in seqlens:
                batch = max(1, tokens // seqlen)
                yield from _measure(ctx, providers, batch, seqlen, heads, head_dim, causal, dtype, device, gen,
                                    budget, mm, args.math_max_elements)


def _tune(ctx, seqlen, tokens, heads, head_dim, causal, dtype, device, gen) -> None:
    """One untimed fwd+bwd of parallax at the longest seqlen: the autotuner (keyed by head dim,
    causality and dtype, not by length) then picks its configurations on a long sequence."""
    batch = max(1, tokens // seqlen)
    q, k, v, do = (torch.randn(batch, seqlen, heads, head_dim, generator=gen, device=device).to(dtype)
                   for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    ctx.log(f"D={head_dim} causal={causal}: first parallax call at seqlen {seqlen} (autotuning when enabled)")
    # a dense output gradient, as in the timed calls (out.sum() would give a stride-0 one)
    torch.autograd.grad(_parallax(q, k, v, causal), leaves, do)
    synchronize(device)


def _measure(ctx, providers, batch, seqlen, heads, head_dim, causal, dtype, device, gen, budget, mm_rate,
             math_max) -> Iterator[dict]:
    shape = (batch, seqlen, heads, head_dim)  # (B, S, H, D)
    q, k, v, do = (torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(4))
    cases: dict[str, _Case] = {}
    for name, (fn, layout) in providers.items():
        if name == "sdpa-math" and batch * heads * seqlen * seqlen > math_max:
            ctx.skip(f"sdpa-math at seqlen {seqlen}, D {head_dim}",
                     f"its {batch}x{heads}x{seqlen}x{seqlen} score matrix exceeds --math-max-elements")
            continue
        ins = (q, k, v, do) if layout == "bshd" else tuple(t.transpose(1, 2).contiguous() for t in (q, k, v, do))
        try:
            cases[name] = _Case(fn, *ins[:3], ins[3], causal)
        except RuntimeError as exc:  # e.g. no flash kernel for this head dim, dtype or device
            ctx.skip(f"{name} at seqlen {seqlen}, D {head_dim}", f"{type(exc).__name__}: {str(exc)[:200]}")
    outs = {name: (c.kept if providers[name][1] == "bshd" else c.kept.transpose(1, 2)).detach()
            for name, c in cases.items()}
    ref = outs.get("sdpa-flash", outs.get("sdpa-math"))
    ctx.log(f"seqlen {seqlen} x batch {batch}, D {head_dim}, H {heads}, causal {causal}: {', '.join(cases)}")

    on_cpu = device.type == "cpu"
    timings = {mode: interleave({name: getattr(c, {"fwd": "fwd", "bwd": "bwd", "fwd+bwd": "fwd_bwd"}[mode])
                                 for name, c in cases.items()}, device=device, warmup=1 if on_cpu else 3,
                                budget_s=budget, min_repeat=3 if on_cpu else 5, max_repeat=100)
               for mode in MODES}
    flash = {mode: timings[mode]["sdpa-flash"].median_s for mode in MODES if "sdpa-flash" in timings[mode]}
    for name in cases:
        row = {"seqlen": seqlen, "batch": batch, "heads": heads, "head_dim": head_dim, "causal": causal,
               "provider": name, "dtype": str(dtype).removeprefix("torch."), "mm_tflops": mm_rate / 1e12}
        for mode, key in zip(MODES, ("fwd", "bwd", "fwdbwd")):
            t = timings[mode][name]
            rate = attention_flops(batch, heads, seqlen, head_dim, causal, mode) / t.median_s
            row[f"{key}_ms"] = 1e3 * t.median_s
            row[f"{key}_p20_ms"] = 1e3 * t.p20_s
            row[f"{key}_p80_ms"] = 1e3 * t.p80_s
            row[f"{key}_tflops"] = rate / 1e12
            row[f"{key}_of_mm"] = rate / mm_rate
            row[f"{key}_vs_flash"] = flash[mode] / t.median_s if mode in flash else None
        row["max_diff"] = (outs[name].float() - ref.float()).abs().max().item() if ref is not None else None
        yield row
    del cases, outs, ref, q, k, v, do
    gc.collect()
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()


def plot(rows: list[dict], path) -> None:
    """TFLOP/s against seqlen, one panel per (head dim, causal): fwd solid, fwd+bwd dashed."""
    from .runner import pyplot

    plt = pyplot()
    panels = sorted({(r["head_dim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (d, causal) in zip(axes[0], panels):
        for i, provider in enumerate(PROVIDERS):
            pts = sorted((r["seqlen"], r["fwd_tflops"], r["fwdbwd_tflops"]) for r in rows
                         if r["provider"] == provider and r["head_dim"] == d and r["causal"] == causal)
            if not pts:
                continue
            s, fwd, fb = zip(*pts)
            ax.plot(s, fwd, marker="o", color=f"C{i}", label=f"{provider} fwd")
            ax.plot(s, fb, marker="s", linestyle="--", color=f"C{i}", label=f"{provider} fwd+bwd")
        mm = [r["mm_tflops"] for r in rows if r.get("mm_tflops")]
        if mm:
            ax.axhline(mm[0], color="k", linestyle=":", label="matmul")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"D={d}, {'causal' if causal else 'non-causal'}")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
