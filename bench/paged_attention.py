"""PagedAttention decode (the parallax kernels against SDPA on a contiguous cache, as KV bandwidth),
and prefill after a long cached prefix (``paged_attention_varlen`` against gather + FlashAttention).

Decode attention reads every cached key and value once per step and does little else, so it is
memory-bound and its figure of merit is the bandwidth of that read: 2 (K and V) * context * H_kv
* D * bytes per element per sequence, divided by the time. The floor is the device's memory
bandwidth, measured in the same process by a device-to-device copy (``dst.copy_(src)``, read +
write bytes / time) interleaved with the providers; ``of copy`` is the fraction reached. The
goal, reported and not asserted: paged decode at >= 80% of the copy bandwidth for contexts of
4k tokens and more.

Providers, on the same queries and the same keys/values:

* ``cuda``, ``cpu``, ``triton``: ``px.ops.paged_attention(backend=...)`` over a paged cache (block
  size 16, every sequence's blocks shuffled over the pool), with the automatic split-K choice
  (``cpu``, the compiled CPU kernel, called as the engine calls it: ``validate=False``);
* ``gather+sdpa`` (CPU): the engine's CPU decode before the CPU kernel
  (``PagedAttentionContext._decode_gather``: per group of 16 sequences, ``index_select`` of their
  whole blocks, then SDPA with a length mask; its index tensors built once, as once per step);
* ``reference``: ``paged_attention_ref`` (CPU), token-by-token gather per sequence, then einsum;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)`` over
  contiguous (N, H_kv, context, D) keys/values, whichever SDPA backend torch picks.

On CUDA the shape is Llama-style GQA (32 query heads over 8 KV heads, head dim 128), bf16; on CPU
the CPU serving model's (``bench serve --http``: 4 heads = 4 KV heads of 64), fp32, at the
engine's batches (64, 128) and contexts (128 to 1024). Every sequence is at the full context (the
gather path's best case: no padding in a group). Caches are flushed from the last-level cache
before each timed call (a real decode step meets each layer's cache cold). ``vs sdpa`` and
``vs gather`` are speedups over ``sdpa`` and ``gather+sdpa``. ``max diff`` is the largest difference from SDPA's output.
Prefill rows (``case`` = prefill): ``--prefill-batch`` sequences, each with a cached prefix of
``--prefill-prefixes`` tokens and ``--prefill-new`` new tokens already written to the cache (a
chunked prefill, or a prompt after a prefix-cache hit), causal attention of the new tokens over
prefix + new. Providers:

* ``varlen``: ``px.ops.paged_attention_varlen``, reading K/V through the block table;
* ``gather+flash``: what the engine's runner did per layer before it: gather every context
  token's K/V out of the cache into packed tensors (``k_cache.view(-1, H_kv, D)[slots]``), then
  ``px.ops.flash_attention_varlen(causal=True)``.

Compute-bound, so the figure is TFLOP/s (FlashAttention's count: 4 * D * H per visible
query-key pair); ``vs gather`` is the speedup over ``gather+flash``, whose output ``max diff``
is measured against.

On CPU the table has the decode case only (the prefill kernels run there only as references or
interpreted); ``--quick`` runs one tiny fp32 case of every code path instead (the Triton kernels
interpreted when TRITON_INTERPRET=1, the prefill case too), which keeps this file from rotting
between GPU runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from parallax import _extension

from .table import Column
from .timing import CacheFlusher, interleave

PROVIDERS = ("cuda", "cpu", "triton", "gather+sdpa", "reference", "sdpa")
DEFAULT_PROVIDERS = {"cuda": "cuda,triton,sdpa", "cpu": "cpu,gather+sdpa,reference,sdpa"}
# Shape defaults per device: (heads, KV heads, head dim, dtype, batches, contexts)
SHAPES = {"cuda": (32, 8, 128, "bf16", "1,8,64", "512,4096,16384"),
          "cpu": (4, 4, 64, "fp32", "64,128", "128,256,512,1024")}
PREFILL_PROVIDERS = ("varlen", "gather+flash")
GOAL = 0.8  # fraction of the copy bandwidth, at contexts >= 4k

COLUMNS = [
    Column("case", "case"),
    Column("batch", "batch", "d"),
    Column("context", "context", "d"),
    Column("new_tokens", "new", "d"),
    Column("provider", "provider"),
    Column("partition", "split [tok]"),
    Column("median_us", "median [us]", ".1f"),
    Column("p20_us", "p20 [us]", ".1f"),
    Column("p80_us", "p80 [us]", ".1f"),
    Column("kv_mb", "KV [MB]", ".1f"),
    Column("gbps", "KV GB/s", ".0f"),
    Column("of_copy", "of copy", ".2f"),
    Column("vs_sdpa", "vs sdpa [x]", ".2f"),
    Column("tflops", "TFLOP/s", ".1f"),
    Column("vs_gather", "vs gather [x]", ".2f"),
    Column("max_diff", "max diff", ".1e"),
]


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--batches", default=None,
                        help="sequences per step (default CUDA 1,8,64, --quick 1,8; CPU 64,128)")
    parser.add_argument("--contexts", default=None,
                        help="tokens per sequence (default CUDA 512,4096,16384, --quick 512,4096; CPU 128,256,512,1024)")
    parser.add_argument("--heads", type=int, default=None, help="query heads (default CUDA 32, CPU 4)")
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads (default CUDA 8, CPU 4)")
    parser.add_argument("--head-dim", type=int, default=None, help="head dim (default CUDA 128, CPU 64)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per cache block (default 16)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default CUDA bf16, CPU fp32")
    parser.add_argument("--providers", default=None,
                        help=f"subset of {','.join(PROVIDERS)} (default CUDA {DEFAULT_PROVIDERS['cuda']}, "
                             f"CPU {DEFAULT_PROVIDERS['cpu']})")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed rounds per case")
    parser.add_argument("--copy-mb", type=int, default=None,
                        help="size of the copy-bandwidth buffers in MB (default CUDA 1024, --quick 256; CPU 256: far "
                             "past the last-level cache, copied in ~0.1 s)")
    parser.add_argument("--prefill-prefixes", default=None,
                        help="cached prefix tokens per sequence of the prefill case (default 4096,16384; --quick: "
                             "4096; empty: no prefill case)")
    parser.add_argument("--prefill-new", type=int, default=512, help="new tokens per sequence (default 512)")
    parser.add_argument("--prefill-batch", type=int, default=4, help="sequences of the prefill case (default 4)")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _copy_bandwidth(device, megabytes: int, flush) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write), median of interleaved repeats."""
    n = megabytes * (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = interleave({"copy": lambda: dst.copy_(src)}, device=device, warmup=3, budget_s=0.5, flush=flush)["copy"]
    return 2 * n / t.median_s


def _paged_case(batch, context, h, h_kv, d, block_size, dtype, device, gen):
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = batch * blocks_per_seq
    q = torch.randn(batch, h, d, generator=gen, device=device).to(dtype)
    # the contiguous keys/values SDPA reads, and the same values scattered into shuffled blocks
    k = torch.randn(batch, h_kv, context, d, generator=gen, device=device).to(dtype)
    v = torch.randn(batch, h_kv, context, d, generator=gen, device=device).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen, device=device).view(batch, blocks_per_seq).int()
    k_cache = torch.zeros(num_blocks, block_size, h_kv, d, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    tok = torch.arange(context, device=device)
    for i in range(batch):
        blocks = tables[i, tok // block_size].long()
        k_cache[blocks, tok % block_size] = k[i].transpose(0, 1)
        v_cache[blocks, tok % block_size] = v[i].transpose(0, 1)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, k, v, k_cache, v_cache, tables, lens


def _engine_gather(q, k_cache, v_cache, tables, lens):
    """The engine's CPU decode before the CPU kernel (``PagedAttentionContext._decode_gather``) on
    these sequences: a function of no arguments, its step metadata built once."""
    from types import SimpleNamespace

    from parallax.inference.attention_metadata import PagedAttentionContext, SeqInput, build_metadata

    bs = k_cache.shape[1]
    seqs = [SeqInput([0], start=n - 1, block_table=row[:math.ceil(n / bs)], sample=True)
            for row, n in zip(tables.tolist(), lens.tolist())]
    meta = build_metadata(seqs, bs, "torch", q.device)
    assert meta.order == list(range(len(seqs))), "equal contexts keep the input order"
    context = PagedAttentionContext(k_cache, [], "torch", meta)
    layer = SimpleNamespace(sliding_window=None)
    meta.decode_groups  # built here, once: the engine builds them once per step, for every layer
    return functools.partial(context._decode_gather, layer, q, k_cache, v_cache)


def run(ctx) -> Iterator[dict]:
    device, args = ctx.device, ctx.args
    on_cpu = device.type != "cuda"
    pa = importlib.import_module("parallax.ops.paged_attention")  # the module (parallax.ops exports the function)

    kind = "cpu" if on_cpu else "cuda"
    wanted = [p.strip() for p in (args.providers or DEFAULT_PROVIDERS[kind]).split(",")]
    bad = [p for p in wanted if p not in PROVIDERS]
    if bad:
        raise ValueError(f"--providers: unknown {bad}; allowed: {', '.join(PROVIDERS)}")
    available = pa._available("paged_attention", device.type)
    if on_cpu and ctx.quick and args.providers is None and "triton" in available:
        wanted.insert(1, "triton")  # the smoke run covers the interpreted kernel too
    for name in ("cuda", "cpu", "triton"):
        if name in wanted and name not in available:
            ctx.skip(name, f"backend {name!r} is not available here (available: {', '.join(available)})")
            wanted.remove(name)
    if not on_cpu and "gather+sdpa" in wanted:
        ctx.skip("gather+sdpa", "the engine's gather path is its CPU decode (CUDA runs the paged kernels)")
        wanted.remove("gather+sdpa")
    heads, kv_heads, head_dim, dtype_default, batches_default, contexts_default = SHAPES[kind]
    h, h_kv, d, bs = args.heads or heads, args.kv_heads or kv_heads, args.head_dim or head_dim, args.block_size
    dtype_name = args.dtype or dtype_default
    if on_cpu and ctx.quick:  # smoke run: tiny shapes (the interpreter runs every program in Python)
        batches, contexts, h, h_kv, d = [2], [40], 4, 2, 32
        budget, copy_mb, flush = 0.02, 16, None
    else:
        batches = _ints(args.batches or ("1,8" if ctx.quick else batches_default))
        contexts = _ints(args.contexts or ("512,4096" if ctx.quick else contexts_default))
        budget, copy_mb = args.budget, args.copy_mb or (256 if ctx.quick or on_cpu else 1024)
        flush = CacheFlusher(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    esize = torch.empty((), dtype=dtype).element_size()

    copy_bw = _copy_bandwidth(device, copy_mb, flush)
    ctx.note("copy_bandwidth", f"{copy_bw / 1e9:.0f} GB/s (device-to-device copy, read + write bytes)")
    ctx.note("default_backend", f"paged_attention on {device.type} defaults to {pa.backend(device.type)!r} "
                                f"(DEFAULT_CUDA_BACKEND = {pa.DEFAULT_CUDA_BACKEND!r})")
    ctx.note("goal", f"paged decode >= {GOAL:.0%} of the copy bandwidth at contexts >= 4096 (reported, not asserted)")
    ctx.note("shape", f"H={h}, H_kv={h_kv}, D={d}, block size {bs}, {dtype_name}")
    if on_cpu and ctx.quick:
        ctx.note("cpu", "a smoke run of the code paths on CPU: the numbers measure nothing")
    elif on_cpu:
        ctx.note("cpu", f"{torch.get_num_threads()} threads, CPU kernel ISA {_extension.cpu_isa()}")
    gen = torch.Generator(device=device).manual_seed(0)

    for batch in batches:
        for context in contexts:
            q, k, v, k_cache, v_cache, tables, lens = _paged_case(batch, context, h, h_kv, d, bs, dtype, device, gen)
            kv_bytes = 2 * batch * context * h_kv * d * esize
            partition = pa.choose_partition_size(batch, h_kv, tables.shape[1] * bs, device)
            fns, outs = {}, {}
            for name in wanted:
                if name == "sdpa":
                    fns[name] = functools.partial(F.scaled_dot_product_attention, q.unsqueeze(2), k, v,
                                                  enable_gqa=True)  # q (N, H, 1, D)
                elif name == "gather+sdpa":
                    fns[name] = _engine_gather(q, k_cache, v_cache, tables, lens)
                elif name == "reference":
                    fns[name] = functools.partial(pa.paged_attention_ref, q, k_cache, v_cache, tables, lens)
                else:
                    fns[name] = functools.partial(pa.paged_attention, q, k_cache, v_cache, tables, lens,
                                                  backend=name, validate=False if name == "cpu" else None)
            for name, fn in fns.items():
                out = fn()
                outs[name] = out.squeeze(2) if name == "sdpa" else out
            split = "" if on_cpu else f", split-K partitions of {partition or 'all'} tokens"  # the CPU kernel never splits
            ctx.log(f"batch {batch}, context {context}: {kv_bytes / 1e6:.1f} MB of K/V{split}")
            timings = interleave(fns, device=device, warmup=1 if on_cpu else 3, budget_s=budget,
                                 min_repeat=3 if on_cpu and ctx.quick else (5 if on_cpu else 10), max_repeat=200,
                                 flush=flush)
            t_sdpa = timings["sdpa"].median_s if "sdpa" in timings else None
            t_gather = timings["gather+sdpa"].median_s if "gather+sdpa" in timings else None
            for name, t in timings.items():
                gbps = kv_bytes / t.median_s / 1e9
                yield {
                    "case": "decode",
                    "batch": batch,
                    "context": context,
                    "new_tokens": 1,
                    "provider": name,
                    "partition": (str(partition) if partition else "none") if name in ("cuda", "triton") else "-",
                    "median_us": 1e6 * t.median_s,
                    "p20_us": 1e6 * t.p20_s,
                    "p80_us": 1e6 * t.p80_s,
                    "reps": t.n,
                    "kv_mb": kv_bytes / 1e6,
                    "gbps": gbps,
                    "copy_gbps": copy_bw / 1e9,
                    "of_copy": gbps * 1e9 / copy_bw,
                    "vs_sdpa": t_sdpa / t.median_s if t_sdpa else None,
                    "vs_gather": t_gather / t.median_s if t_gather else None,
                    "max_diff": ((outs[name].float() - outs["sdpa"].float()).abs().max().item()
                                 if "sdpa" in outs else None),
                    "dtype": dtype_name,
                    "heads": h,
                    "kv_heads": h_kv,
                    "head_dim": d,
                    "block_size": bs,
                }
            del q, k, v, k_cache, v_cache, tables, lens, fns, outs
            _free_memory()
    if on_cpu and not ctx.quick:
        return  # the prefill kernels run on CPU only as references or interpreted: nothing to measure
    shape = dict(h=h, h_kv=h_kv, d=d, bs=bs, dtype=dtype, dtype_name=dtype_name)
    yield from _prefill_rows(ctx, shape, copy_bw, budget, flush, gen)


def _free_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()


def _prefill_cache(batch, context, h_kv, d, block_size, dtype, device, gen):
    """Random caches whose blocks all belong to the batch's sequences, each sequence's blocks
    shuffled over the pool: k_cache, v_cache (num_blocks, block_size, H_kv, D), tables int32."""
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen, device=device).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen, device=device).view(batch, blocks_per_seq).int()
    return k_cache, v_cache, tables


def _gather_flash(q, k_cache, v_cache, slots, cu_q, cu_k, max_q, max_k):
    """The engine runner's prefill before paged_attention_varlen: copy every context token's K/V
    out of the cache into packed tensors, then FlashAttention over them."""
    from parallax.ops import flash_attention_varlen

    h_kv, d = k_cache.shape[2], k_cache.shape[3]
    k = k_cache.view(-1, h_kv, d)[slots]  # (total context, H_kv, D)
    v = v_cache.view(-1, h_kv, d)[slots]
    return flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)


def _prefill_rows(ctx, shape: dict, copy_bw: float, budget: float, flush, gen) -> Iterator[dict]:
    """The prefill case: new tokens after a cached prefix, paged_attention_varlen against
    gather + flash_attention_varlen (see the module docstring)."""
    from parallax import ops

    device, args = ctx.device, ctx.args
    h, h_kv, d, bs, dtype = shape["h"], shape["h_kv"], shape["d"], shape["bs"], shape["dtype"]
    if device.type != "cuda":  # smoke run, like the decode case
        batch, prefixes, new = 2, [31], 9
    else:
        default = "4096" if ctx.quick else "4096,16384"
        batch, new = args.prefill_batch, args.prefill_new
        prefixes = _ints(default if args.prefill_prefixes is None else args.prefill_prefixes)
    ctx.note("prefill_backends", f"paged_attention_varlen: {ops.backend('paged_attention_varlen', device)!r}, "
                                 f"flash_attention_varlen: {ops.backend('flash_attention', device)!r}")
    esize = torch.empty((), dtype=dtype).element_size()
    for prefix in prefixes:
        context = prefix + new
        k_cache, v_cache, tables = _prefill_cache(batch, context, h_kv, d, bs, dtype, device, gen)
        q = torch.randn(batch * new, h, d, generator=gen, device=device).to(dtype)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        offsets = torch.arange(batch + 1, dtype=torch.int32, device=device)
        tok = torch.arange(context, device=device)
        slots = (tables.long()[:, tok // bs] * bs + tok % bs).reshape(-1)  # every context token's cache slot
        fns = {"varlen": functools.partial(ops.paged_attention_varlen, q, k_cache, v_cache, tables, offsets * new, lens,
                                           new),
               "gather+flash": functools.partial(_gather_flash, q, k_cache, v_cache, slots, offsets * new,
                                                 offsets * context, new, context)}
        outs = {name: fn() for name, fn in fns.items()}
        ctx.log(f"prefill: {batch} sequences x ({prefix} cached + {new} new tokens)")
        timings = interleave(fns, device=device, warmup=1 if device.type != "cuda" else 3, budget_s=budget,
                             min_repeat=3 if device.type != "cuda" else 10, max_repeat=200, flush=flush)
        flops = 4.0 * batch * h * d * (new * prefix + new * (new + 1) / 2)  # visible query-key pairs, causal
        kv_bytes = 2 * batch * context * h_kv * d * esize
        for name, t in timings.items():
            gbps = kv_bytes / t.median_s / 1e9
            yield {
                "case": "prefill",
                "batch": batch,
                "context": context,
                "new_tokens": new,
                "provider": name,
                "median_us": 1e6 * t.median_s,
                "p20_us": 1e6 * t.p20_s,
                "p80_us": 1e6 * t.p80_s,
                "reps": t.n,
                "kv_mb": kv_bytes / 1e6,
                "gbps": gbps,
                "copy_gbps": copy_bw / 1e9,
                "of_copy": gbps * 1e9 / copy_bw,
                "tflops": flops / t.median_s / 1e12,
                "vs_gather": timings["gather+flash"].median_s / t.median_s,
                "max_diff": (outs[name].float() - outs["gather+flash"].float()).abs().max().item(),
                "dtype": shape["dtype_name"],
                "heads": h,
                "kv_heads": h_kv,
                "head_dim": d,
                "block_size": bs,
            }
        del k_cache, v_cache, tables, q, slots, fns, outs
        _free_memory()


def plot(rows: list[dict], path) -> None:
    """KV bandwidth against context, one line per (provider, batch), with the copy bandwidth."""
    from .runner import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in rows if r.get("case", "decode") == "decode"]
    for provider in PROVIDERS:
        for batch in sorted({r["batch"] for r in rows}):
            pts = sorted((r["context"], r["gbps"]) for r in rows if r["provider"] == provider and r["batch"] == batch)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{provider}, batch {batch}")
    copy = [r["copy_gbps"] for r in rows if r.get("copy_gbps")]
    if copy:
        ax.axhline(copy[0], color="k", linestyle="--", label="device copy")
        ax.axhline(GOAL * copy[0], color="gray", linestyle=":", label=f"{GOAL:.0%} of copy")
    ax.set_xscale("log")
    ax.set_xlabel("context [tokens]")
    ax.set_ylabel("K/V read [GB/s]")
    if rows:
        r = rows[0]
        ax.set_title(f"PagedAttention decode (H {r['heads']}/{r['kv_heads']}, D {r['head_dim']}, {r['dtype']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
