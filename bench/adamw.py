"""AdamW step: parallax against torch foreach/fused and DeepSpeed's CPU Adam, with the memory floor.

An AdamW step is memory-bound, so the physical floor is bytes moved / memory bandwidth:

* fp32: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq = 28 B/param.
* bf16 params with fp32 master weights: read master 4, grad 2, exp_avg 4, exp_avg_sq 4; write
  master 4, exp_avg 4, exp_avg_sq 4, bf16 param 2 = 28 B/param when done in one pass
  (``parallax.optim.AdamW(..., master_weights=True)``). The plain-PyTorch baseline is what a
  mixed-precision loop does: copy the bf16 grads into fp32 master grads (2+4 B), fp32 step on
  the masters (28 B), copy the masters into the bf16 params (4+2 B) = 40 B/param; its GB/s
  counts those 40. The floor of both is 28 B/param.

The bandwidth is measured in the same process, interleaved with the optimizers of every case,
by a STREAM triad: ``torch.ops.parallax.stream_triad_`` (OpenMP + SIMD) on CPU, over arrays far
larger than the last-level cache, both as a = b + s*c (16 B/element: read b, c, write a and the
write-allocate read of a) and in place a = a + s*c (12 B/element); the faster of the two is the
floor's bandwidth. On CUDA the triad is ``torch.add(b, c, alpha=s, out=a)`` (12 B/element).

Every provider steps the same initial weights with the same gradients, called round-robin
(``bench.timing.interleave``) with the caches flushed before each call, the way an optimizer
step meets its tensors after a backward pass. ``max diff`` is the largest absolute difference
of each provider's fp32 weights (the master weights in bf16 mode) from torch fused's after all
the steps: it catches a provider that is fast because it is wrong.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .table import Column
from .timing import CacheFlusher, interleave

PROVIDERS = ("parallax", "torch-foreach", "torch-fused", "deepspeed")
REFERENCE = "torch-fused"
MODES = ("fp32", "bf16-master")
FLOOR_BYTES_PER_PARAM = 28
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)

COLUMNS = [
    Column("mode", "mode"),
    Column("layout", "layout"),
    Column("params", "params [M]", ".2f", scale=1e-6),
    Column("tensors", "tensors", "d"),
    Column("provider", "provider"),
    Column("median_ms", "median [ms]", ".3f"),
    Column("p20_ms", "p20 [ms]", ".3f"),
    Column("p80_ms", "p80 [ms]", ".3f"),
    Column("bytes_per_param", "bytes [B/param]", "d"),
    Column("gbps", "GB/s", ".1f"),
    Column("speedup_vs_fused", "vs fused [x]", ".2f"),
    Column("floor_ms", "floor [ms]", ".3f"),
    Column("x_floor", "x floor", ".2f"),
    Column("stream_gbps", "stream [GB/s]", ".1f"),
    Column("max_diff", "max diff", ".1e"),
]


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--sizes", default=None,
                        help="parameter counts, e.g. 1M,4M,16M,64M (default; --quick: 1M); K/M/G = 1e3/1e6/1e9")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--flat", choices=("largest", "all", "none"), default="largest",
                        help="also time one flat tensor of the largest size (default), of every size, or none")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3; --quick: 1)")
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds (default: from --budget)")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed rounds per case")
    parser.add_argument("--stream-mb", type=int, default=None,
                        help="size of each STREAM array in MB (default 256 on CPU, 1024 on CUDA; --quick: 64)")
    parser.add_argument("--no-flush", action="store_true", help="do not flush caches between calls")


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    return int(float(number) * scale)


def layer_shapes(n: int) -> list[tuple[int, ...]]:
    """Shapes of a GPT-like model of about ``n`` parameters, in the order a model lists them.

    ``layers`` blocks of (ln1 w/b, qkv w/b, proj w/b, ln2 w/b, fc w/b, fc2 w/b), a final norm,
    and a token embedding of an uneven vocabulary filling the rest.
    """
    layers = 4 if n < 8_000_000 else 8
    d = 64
    while 12 * (d + 64) ** 2 * layers <= 0.85 * n:
        d += 64
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    used = layers * sum(math.prod(s) for s in block) + 2 * d
    vocab = max(1, (n - used) // d)
    return [(vocab, d)] + block * layers + [(d,), (d,)]


# --------------------------------------------------------------------------------------------
# memory bandwidth (the floor)


@dataclass
class _Stream:
    fns: dict[str, Callable[[], object]]
    bytes_per_call: dict[str, int]
    how: str


def _stream(device: torch.device, megabytes: int, ctx) -> _Stream:
    n = megabytes * (1 << 20) // 4
    a = torch.zeros(n, device=device)
    b = torch.rand(n, device=device)
    c = torch.rand(n, device=device)
    s = 1e-3
    if device.type == "cuda":
        fns = {
            "triad": lambda: torch.add(b, c, alpha=s, out=a),
            "triad-inplace": lambda: torch.add(a, c, alpha=s, out=a),
        }
        return _Stream(fns, {"triad": 12 * n, "triad-inplace": 12 * n}, "torch.add triad, 12 B/element")
    try:
        from parallax import ops

        has_op = ops.backend("stream_triad", "cpu") == "cpp"
    except ImportError:
        has_op = False
    if has_op:
        fns = {"triad": lambda: ops.stream_triad_(a, b, c, s), "triad-inplace": lambda: ops.stream_triad_(a, a, c, s)}
        how = "parallax stream_triad_ (a=b+s*c 16 B/elem, a=a+s*c 12 B/elem)"
    else:
        ctx.log("parallax's C++ stream_triad_ is missing (extension not built?); "
                "the floor uses torch.add, which may understate the bandwidth")
        fns = {"triad": lambda: torch.add(b, c, alpha=s, out=a), "triad-inplace": lambda: a.add_(c, alpha=s)}
        how = "torch.add triad (fallback: parallax._C missing)"
    return _Stream(fns, {"triad": 16 * n, "triad-inplace": 12 * n}, how)


# --------------------------------------------------------------------------------------------
# providers


@dataclass
class _Provider:
    name: str
    backend: str
    bytes_per_param: int
    step: Callable[[], None]
    weights: Callable[[], list[torch.Tensor]]  # fp32 weights after the steps (masters in bf16 mode)


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def _torch_factory(kind: str) -> Callable:
    def build(params):
        if kind == "fused":
            return torch.optim.AdamW(params, **HYPER, fused=True)
        return torch.optim.AdamW(params, **HYPER, foreach=True)

    return build


class _Availability:
    """Which providers can run here, decided once per benchmark run (with logged reasons)."""

    def __init__(self, ctx, wanted: list[str]) -> None:
        self.factories: dict[str, Callable] = {}
        self.backends: dict[str, str] = {}
        for name in wanted:
            if name == "parallax":
                self._parallax(ctx)
            elif name == "deepspeed":
                self._deepspeed(ctx)
            else:
                kind = name.split("-", 1)[1]
                self.factories[name] = _torch_factory(kind)
                self.backends[name] = f"torch {kind}"

    def _parallax(self, ctx) -> None:
        try:
            import parallax
            from parallax.optim import AdamW
        except Exception as exc:
            ctx.skip("parallax", f"parallax.optim.AdamW unavailable ({type(exc).__name__}: {exc})")
            return
        backend = parallax.ops.backend("adamw", ctx.device)
        if backend == "reference":
            ctx.log("WARNING: parallax AdamW runs its plain-PyTorch reference here (no compiled kernel)")
        self.factories["parallax"] = lambda params, master=False: AdamW(params, **HYPER, master_weights=master)
        self.backends["parallax"] = f"parallax {backend}"
        ctx.note("parallax_adamw_backend", backend)

    def _deepspeed(self, ctx) -> None:
        if ctx.device.type != "cpu":
            ctx.skip("deepspeed", "DeepSpeedCPUAdam is a CPU optimizer; on CUDA the baselines are torch's")
            return
        if importlib.util.find_spec("deepspeed") is None:
            ctx.skip("deepspeed", "deepspeed is not installed (pip install deepspeed)")
            return
        ctx.log("loading DeepSpeed's cpu_adam op (first use compiles it, about a minute)")
        try:
            import deepspeed
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            probe = torch.nn.Parameter(torch.zeros(8))
            probe.grad = torch.zeros(8)
            DeepSpeedCPUAdam([probe], adamw_mode=True).step()  # builds/loads the op now
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if exc.__cause__ is not None:
                reason += f" (caused by {type(exc.__cause__).__name__}: {exc.__cause__})"
            ctx.skip("deepspeed", f"DeepSpeedCPUAdam unavailable: {reason}")
            return
        ctx.add_version("deepspeed", deepspeed.__version__)
        self.factories["deepspeed"] = lambda params: DeepSpeedCPUAdam(params, **HYPER, adamw_mode=True)
        self.backends["deepspeed"] = "deepspeed cpu_adam"


def _build(name: str, factory: Callable, backend: str, mode: str,
           init: list[torch.Tensor], grads: list[torch.Tensor]) -> _Provider:
    params = [torch.nn.Parameter(x.clone()) for x in init]
    for p, g in zip(params, grads):
        p.grad = g
    if mode == "fp32":
        opt = factory(params)
        return _Provider(name, backend, 28, torch.no_grad()(opt.step), lambda: params)
    if name == "parallax":  # one pass: fp32 master, moments and the bf16 copy
        opt = factory(params, master=True)
        return _Provider(name, backend, 28, torch.no_grad()(opt.step),
                         lambda: [opt.state[p]["master_param"] for p in params])
    # plain-PyTorch mixed precision: grads -> fp32 master grads, fp32 step, masters -> bf16 params
    masters = [torch.nn.Parameter(p.detach().float()) for p in params]
    master_grads = [torch.empty_like(m) for m in masters]
    for m, g in zip(masters, master_grads):
        m.grad = g
    opt = factory(masters)

    @torch.no_grad()
    def step() -> None:
        _copy_all(master_grads, grads)
        opt.step()
        _copy_all(params, masters)

    return _Provider(name, f"{backend} + copies", 40, step, lambda: masters)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.detach().float() - y.detach().float()).abs().max()) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------


def run(ctx) -> Iterator[dict]:
    args, device = ctx.args, ctx.device
    sizes = [parse_size(s) for s in (args.sizes or ("1M" if ctx.quick else "1M,4M,16M,64M")).split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    wanted = [p.strip() for p in args.providers.split(",")]
    for value, allowed, what in ((modes, MODES, "--modes"), (wanted, PROVIDERS, "--providers")):
        bad = [v for v in value if v not in allowed]
        if bad:
            raise ValueError(f"{what}: unknown {bad}; allowed: {', '.join(allowed)}")
    warmup = args.warmup if args.warmup is not None else (1 if ctx.quick else 3)
    repeat = args.repeat if args.repeat is not None else (5 if ctx.quick else None)
    stream_mb = args.stream_mb or (64 if ctx.quick else (1024 if device.type == "cuda" else 256))

    cases = [(n, "layers") for n in sizes]
    if args.flat == "all":
        cases += [(n, "flat") for n in sizes]
    elif args.flat == "largest" and not ctx.quick:
        cases.append((max(sizes), "flat"))

    available = _Availability(ctx, wanted)
    stream = _stream(device, stream_mb, ctx)
    ctx.note("floor", f"{FLOOR_BYTES_PER_PARAM} B/param / bandwidth of {stream.how}, "
                      f"{stream_mb} MB arrays, faster pattern, measured per case")
    flush = None if args.no_flush else CacheFlusher(device)

    for mode in modes:
        for n, layout in cases:
            shapes = layer_shapes(n) if layout == "layers" else [(n,)]
            numel = sum(math.prod(s) for s in shapes)
            gen = torch.Generator().manual_seed(0)
            dtype = torch.float32 if mode == "fp32" else torch.bfloat16
            init = [(0.02 * torch.randn(s, generator=gen)).to(device, dtype) for s in shapes]
            grads = [(1e-3 * torch.randn(s, generator=gen)).to(device, dtype) for s in shapes]
            providers = [
                _build(name, factory, available.backends[name], mode, init, grads)
                for name, factory in available.factories.items()
            ]
            ctx.log(f"{mode} {layout} {numel / 1e6:.2f}M params in {len(shapes)} tensors: "
                    f"{', '.join(p.name for p in providers)} + STREAM")
            fns = {p.name: p.step for p in providers}
            fns.update({f"~{k}": f for k, f in stream.fns.items()})
            timings = interleave(fns, device=device, warmup=warmup, repeat=repeat, budget_s=args.budget,
                                 min_repeat=5 if ctx.quick else 15, max_repeat=60, flush=flush)

            bandwidths = {k: stream.bytes_per_call[k] / timings[f"~{k}"].median_s for k in stream.fns}
            bw = max(bandwidths.values())
            floor_s = FLOOR_BYTES_PER_PARAM * numel / bw
            ref = next((p for p in providers if p.name == REFERENCE), providers[0] if providers else None)
            t_ref = timings[ref.name].median_s if ref is not None else None
            ref_weights = ref.weights() if ref is not None else None
            for p in providers:
                t = timings[p.name]
                yield {
                    "mode": mode,
                    "layout": layout,
                    "params": numel,
                    "tensors": len(shapes),
                    "provider": p.name,
                    "backend": p.backend,
                    "median_ms": t.median_ms,
                    "p20_ms": t.p20_ms,
                    "p80_ms": t.p80_ms,
                    "reps": t.n,
                    "bytes_per_param": p.bytes_per_param,
                    "gbps": p.bytes_per_param * numel / t.median_s / 1e9,
                    "speedup_vs_fused": (t_ref / t.median_s) if ref is not None and ref.name == REFERENCE else None,
                    "floor_ms": 1e3 * floor_s,
                    "x_floor": t.median_s / floor_s,
                    "stream_gbps": bw / 1e9,
                    "stream_triad_gbps": bandwidths["triad"] / 1e9,
                    "stream_inplace_gbps": bandwidths["triad-inplace"] / 1e9,
                    "max_diff": _max_diff(p.weights(), ref_weights) if ref_weights is not None else None,
                    "cache_flush": flush is not None,
                }
            del providers, fns, init, grads, ref, ref_weights
            gc.collect()


def plot(rows: list[dict], path) -> None:
    """Useful bandwidth (28 B/param / time) against size, per mode, with the STREAM bandwidth."""
    from .runner import pyplot

    plt = pyplot()
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        mine = [r for r in rows if r["mode"] == mode]
        for name in PROVIDERS:
            pts = sorted((r["params"], FLOOR_BYTES_PER_PARAM * r["params"] / r["median_ms"] / 1e6)
                         for r in mine if r["provider"] == name and r["layout"] == "layers")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
            flat = [(r["params"], FLOOR_BYTES_PER_PARAM * r["params"] / r["median_ms"] / 1e6)
                    for r in mine if r["provider"] == name and r["layout"] == "flat"]
            if flat:
                ax.scatter(*zip(*flat), marker="x", color=ax.lines[-1].get_color() if pts else None)
        stream = sorted((r["params"], r["stream_gbps"]) for r in mine if r["layout"] == "layers")
        if stream:
            ax.plot(*zip(*stream), "k--", label="STREAM (floor)")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("useful GB/s (28 B/param / time)")
        ax.set_title(f"AdamW step, {mode} (x = one flat tensor)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
