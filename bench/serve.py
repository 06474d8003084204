"""Serving: continuous batching with a paged KV cache against static batching and HF generate.

Workload: N requests, all arriving at t=0, whose prompt and output lengths follow clipped
log-normal distributions (a long tail, as in ShareGPT: most requests are short, a few are very
long); prompts are random token ids, and each request generates exactly its output length
(greedy, end-of-text ignored), so every engine does the same useful work. The parameters are
printed in the ``workload`` note.

Engines, all on the same weights (a randomly initialised Hugging Face GPT-2-architecture model,
imported with ``GPT.from_hf``), in one process:

* ``parallax continuous``: ``px.inference`` with every request queued at once; requests join
  and leave the running batch at every step (up to ``--batch`` sequences).
* ``parallax static``: the same engine and kernels with request-level scheduling: ``--batch``
  requests at a time, and a batch runs until its longest request ends, every sequence computing
  a token each step (as a padded static batch does; only the requested tokens count); the next
  batch starts then.
* ``HF sequential``: ``transformers`` ``generate``, one request after another (with
  ``--hf-requests K``, only the first K, and the rate is measured on those).
* ``HF padded``: ``generate`` on ``--batch`` requests at a time, left-padded, running until the
  batch's longest output; only the requested tokens count.

Columns: output tokens/s (requested tokens / wall time); time to first token (from t=0, so it
includes queueing) mean and p99; KV waste, the share of the KV slots an engine holds that hold
no token, averaged over its decoding steps (parallax: ``LLM.stats()`` after every step, block
granularity; HF: the padding of its dynamically grown cache, computed); ``contig. waste``: the
same schedule if each running request had reserved a contiguous region of max_model_len slots
(static and padded batches keep it until the whole batch ends); ``same tokens``: the share of
requests whose tokens equal HF sequential's.

``decode batch=B`` rows measure the decode phase alone: B requests with short prompts, tokens/s
after every request has its first token (the GPU check: batch 64 against batch 1).

Goals (vLLM's paper), reported not asserted: KV waste under 4%; continuous batching at least 2x
static batching's and 5x sequential HF generate's throughput.

``--http`` runs ``bench.serve_http`` instead: ``parallax serve`` against ``transformers serve`` and the
in-process engine under Poisson load over HTTP (its own options: ``--rates``, ``--duration``,
``--max-requests``, ``--burst``, ``--adapters``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .table import Column
from .timing import quantile

COLUMNS = [
    Column("provider", "provider"),
    Column("requests", "requests", "d"),
    Column("output_tokens", "out tokens", "d"),
    Column("tokens_per_s", "tokens/s", ",.1f"),
    Column("ttft_mean_ms", "TTFT mean [ms]", ",.0f"),
    Column("ttft_p99_ms", "TTFT p99 [ms]", ",.0f"),
    Column("kv_waste_pct", "KV waste [%]", ".1f"),
    Column("contig_waste_pct", "contig. waste [%]", ".1f"),
    Column("vs_static", "vs static [x]", ".2f"),
    Column("vs_hf_sequential", "vs HF seq [x]", ".2f"),
    Column("vs_batch1", "vs batch 1 [x]", ".2f"),
    Column("same_tokens_pct", "same tokens [%]", ".0f"),
    Column("preemptions", "preempt", "d"),
    Column("wall_s", "wall [s]", ".2f"),
]

GOAL_WASTE_PCT = 4.0
GOAL_VS_STATIC = 2.0
GOAL_VS_HF_SEQUENTIAL = 5.0


@dataclass(frozen=True)
class Workload:
    """Request lengths: log-normal with the given median and sigma (of the log), clipped."""

    num_requests: int
    prompt_median: float
    prompt_sigma: float
    prompt_range: tuple[int, int]
    output_median: float
    output_sigma: float
    output_range: tuple[int, int]
    seed: int = 0


@dataclass(frozen=True)
class Setup:
    """Model (GPT-2 architecture) and engine sizes for one device and mode."""

    n_layer: int
    n_embd: int
    n_head: int
    context: int
    vocab: int
    batch: int
    decode_batches: tuple[int, ...]
    decode_prompt: int
    decode_tokens: int
    hf_requests: int | None  # None: every request


# CPU: a small GPT-2 (4 x 256, the real 50257-token vocabulary and 1024-token context), lengths
# about half ShareGPT's (input mean ~160, output mean ~340 tokens in vLLM's paper).
# CUDA: GPT-2 small (124M) on ShareGPT-sized requests.
CPU = (Setup(n_layer=4, n_embd=256, n_head=4, context=1024, vocab=50257, batch=32, decode_batches=(1, 64),
             decode_prompt=16, decode_tokens=64, hf_requests=16),
       Workload(num_requests=96, prompt_median=64, prompt_sigma=1.0, prompt_range=(4, 512),
                output_median=96, output_sigma=1.0, output_range=(4, 384)))
CUDA = (Setup(n_layer=12, n_embd=768, n_head=12, context=1024, vocab=50257, batch=64, decode_batches=(1, 64),
              decode_prompt=32, decode_tokens=256, hf_requests=16),
        Workload(num_requests=256, prompt_median=100, prompt_sigma=1.0, prompt_range=(4, 768),
                 output_median=200, output_sigma=1.0, output_range=(4, 512)))
QUICK = (Setup(n_layer=2, n_embd=64, n_head=2, context=128, vocab=1000, batch=4, decode_batches=(1, 4),
               decode_prompt=8, decode_tokens=8, hf_requests=None),
         Workload(num_requests=10, prompt_median=12, prompt_sigma=0.8, prompt_range=(2, 48),
                  output_median=8, output_sigma=0.8, output_range=(2, 40)))


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--requests", type=int, default=None, help="number of requests (default: 96 on CPU, 256 on CUDA)")
    parser.add_argument("--batch", type=int, default=None,
                        help="max running sequences (continuous) and batch size (static, HF padded)")
    parser.add_argument("--hf-requests", type=int, default=None,
                        help="HF sequential runs only the first K requests (default 16; --quick: all)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baselines")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="model dtype (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--http", action="store_true",
                        help="serving over HTTP: parallax serve vs transformers serve and the in-process engine")
    from .serve_http import add_arguments as add_http_arguments

    add_http_arguments(parser)


def columns(args: argparse.Namespace) -> list[Column]:
    """The table's columns: ``bench.serve_http``'s with ``--http``."""
    if args.http:
        from .serve_http import COLUMNS as HTTP_COLUMNS

        return HTTP_COLUMNS
    return COLUMNS


def make_requests(w: Workload, vocab: int, context: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request; prompt + output never exceeds ``context``."""
    rng = np.random.default_rng(w.seed)

    def lengths(median: float, sigma: float, lo_hi: tuple[int, int]) -> np.ndarray:
        x = np.round(rng.lognormal(math.log(median), sigma, w.num_requests))
        return np.clip(x, *lo_hi).astype(int)

    prompts = lengths(w.prompt_median, w.prompt_sigma, w.prompt_range)
    outputs = lengths(w.output_median, w.output_sigma, w.output_range)
    requests = []
    for p, o in zip(prompts.tolist(), outputs.tolist()):
        o = min(o, context - p)
        requests.append((rng.integers(0, vocab, p).tolist(), o))
    return requests


def _describe(values: list[int]) -> str:
    return (f"mean {np.mean(values):.1f}, p50 {quantile(values, 0.5):.0f}, p99 {quantile(values, 0.99):.0f}, "
            f"max {max(values)}")


class _Waste:
    """Slot-weighted KV waste over steps: held slots without a token, and the same schedule's
    waste under a contiguous max_model_len reservation per request."""

    def __init__(self, context: int) -> None:
        self.context = context
        self.held = self.empty = self.reserved = self.used = 0

    def add(self, held: int, tokens: int, reserving_requests: int) -> None:
        self.held += held
        self.empty += held - tokens
        self.reserved += reserving_requests * self.context
        self.used += tokens

    @property
    def waste_pct(self) -> float:
        return 100.0 * self.empty / self.held if self.held else 0.0

    @property
    def contig_pct(self) -> float:
        return 100.0 * (1 - self.used / self.reserved) if self.reserved else 0.0


def _parallax(model, requests, batch: int, static: bool, context: int) -> dict:
    """Run the workload through px.inference; continuous (all queued) or static (batch by batch)."""
    from parallax.inference import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(model, config=EngineConfig(block_size=16, max_num_seqs=batch))
    bs = engine.blocks.block_size
    waste = _Waste(context)
    outputs: dict[str, object] = {}
    order: list[str] = []
    groups = [requests[i:i + batch] for i in range(0, len(requests), batch)] if static else [requests]
    start = time.perf_counter()
    for group in groups:
        longest = max(n for _, n in group)
        for prompt, n in group:
            params = SamplingParams(max_tokens=longest if static else n, temperature=0, ignore_eos=True)
            order.append(engine.add_request(prompt, params))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
            stats = engine.stats()
            # static batching reserves for the whole batch until its last request ends
            waste.add(stats.used * bs, stats.tokens, len(group) if static else len(engine.scheduler.running))
    wall = time.perf_counter() - start
    outs = [outputs[i] for i in order]
    return dict(wall_s=wall, tokens=[o.token_ids[:n] for o, (_, n) in zip(outs, requests)], ttft_s=[o.first_token_time - start for o in outs],
                kv_waste_pct=waste.waste_pct, contig_waste_pct=waste.contig_pct,
                preemptions=engine.num_preemptions, num_blocks=engine.blocks.num_blocks)


class _FirstToken:
    """A logits processor that records when generate produced the logits of its first token."""

    def __init__(self) -> None:
        self.time: float | None = None

    def __call__(self, input_ids, scores):
        if self.time is None:
            self.time = time.perf_counter()
        return scores


def _hf_generate(hf, prompts: list[list[int]], new_tokens: int, pad_id: int, device) -> tuple[torch.Tensor, float]:
    """Left-padded greedy generate of exactly ``new_tokens`` tokens; (B, new_tokens) ids, first-token time."""
    from transformers import LogitsProcessorList

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    first = _FirstToken()
    with torch.no_grad():
        out = hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                          logits_processor=LogitsProcessorList([first]))
    return out[:, width:].cpu(), first.time


def _hf_sequential(hf, requests, context: int, device) -> dict:
    waste = _Waste(context)
    tokens, ttft = [], []
    start = time.perf_counter()
    for prompt, n in requests:
        out, first = _hf_generate(hf, [prompt], n, 0, device)
        tokens.append(out[0].tolist())
        ttft.append(first - start)
        for t in range(n):  # its cache grows token by token: no padding, nothing empty
            waste.add(len(prompt) + t, len(prompt) + t, 1)
    return dict(wall_s=time.perf_counter() - start, tokens=tokens, ttft_s=ttft,
                kv_waste_pct=waste.waste_pct, contig_waste_pct=waste.contig_pct)


def _hf_padded(hf, requests, batch: int, context: int, device) -> dict:
    waste = _Waste(context)
    tokens, ttft = [], []
    start = time.perf_counter()
    for lo in range(0, len(requests), batch):
        group = requests[lo:lo + batch]
        longest = max(n for _, n in group)
        out, first = _hf_generate(hf, [p for p, _ in group], longest, 0, device)
        width = max(len(p) for p, _ in group)
        for i, (p, n) in enumerate(group):
            tokens.append(out[i, :n].tolist())
            ttft.append(first - start)
        for t in range(longest):  # every row holds width + t slots; a finished row's are all waste
            waste.add(len(group) * (width + t), sum(len(p) + min(t, n) for p, n in group), len(group))
    return dict(wall_s=time.perf_counter() - start, tokens=tokens, ttft_s=ttft,
                kv_waste_pct=waste.waste_pct, contig_waste_pct=waste.contig_pct)


def _decode_rate(model, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    """Decode tokens/s with ``batch`` running sequences, after every one has its first token."""
    from parallax.inference import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(model, config=EngineConfig(block_size=16, max_num_seqs=batch,
                                                  max_num_batched_tokens=max(2048, batch * prompt_len)))
    rng = np.random.default_rng(1)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(rng.integers(0, vocab, prompt_len).tolist(), params)
    counts: dict[str, int] = {}
    decode_start = start_count = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            counts[out.request_id] = len(out.token_ids)
        if decode_start is None and len(counts) == batch:  # every request has its first token
            decode_start, start_count = time.perf_counter(), sum(counts.values())
    end = time.perf_counter()
    return dict(wall_s=end - decode_start, decoded=sum(counts.values()) - start_count)


# A quick run's engines finish in milliseconds: one run each gave continuous/static ratios of 33x,
# 0.05x and 0.47x in three runs. The median of 5 interleaved runs is stable to about 2x.
QUICK_REPEATS = 5


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _goals(cont: dict) -> dict[str, str]:
    """The goals of the module docstring, judged on the continuous-batching row."""
    goals = {
        f"KV waste < {GOAL_WASTE_PCT:g}%": f"{cont['kv_waste_pct']:.2f}% (contiguous max-length reservation: "
                                            f"{cont['contig_waste_pct']:.1f}%), "
                                            f"{_verdict(cont['kv_waste_pct'] < GOAL_WASTE_PCT)}",
        f"throughput >= {GOAL_VS_STATIC:g}x static batching":
            f"{cont['vs_static']:.2f}x, {_verdict(cont['vs_static'] >= GOAL_VS_STATIC)}",
    }
    if cont["vs_hf_sequential"] is not None:
        goals[f"throughput >= {GOAL_VS_HF_SEQUENTIAL:g}x sequential HF generate"] = (
            f"{cont['vs_hf_sequential']:.2f}x, {_verdict(cont['vs_hf_sequential'] >= GOAL_VS_HF_SEQUENTIAL)}")
    return goals


def _median_runs(ctx, engines: dict, repeats: int) -> dict[str, dict]:
    """Each engine's result with the median wall time over ``repeats`` round-robin runs, after one
    warm-up run each (first-call costs out of the timings)."""
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for name, engine in engines.items():
        ctx.log(f"{name}: warm-up")
        engine()
    for _ in range(repeats):
        for name, engine in engines.items():
            ctx.log(name)
            runs[name].append(engine())
    return {name: sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2] for name, rs in runs.items()}


def run(ctx) -> Iterator[dict]:
    if ctx.args.http:
        from .serve_http import run as run_http

        yield from run_http(ctx)
        return
    from parallax.models import GPT

    setup, workload = QUICK if ctx.quick else (CUDA if ctx.device.type == "cuda" else CPU)
    if ctx.args.requests is not None:
        workload = Workload(**{**asdict(workload), "num_requests": ctx.args.requests})
    batch = ctx.args.batch or setup.batch
    hf_requests = ctx.args.hf_requests or setup.hf_requests
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        ctx.args.dtype or ("bf16" if ctx.device.type == "cuda" else "fp32")]
    device = ctx.device

    try:
        import transformers
    except ImportError:  # e.g. a bare GPU image: the parallax engines alone, on the same architecture
        transformers = None
    torch.manual_seed(0)
    if transformers is not None:
        ctx.add_version("transformers", transformers.__version__)
        hf_config = transformers.GPT2Config(n_layer=setup.n_layer, n_embd=setup.n_embd, n_head=setup.n_head,
                                            n_positions=setup.context, vocab_size=setup.vocab, bos_token_id=0,
                                            eos_token_id=0)
        hf = transformers.GPT2LMHeadModel(hf_config).eval()
        with torch.no_grad():
            # a random GPT-2's logits are nearly flat; a larger final LayerNorm gain makes greedy
            # choices clear-cut, so that engines with different kernels pick the same tokens
            hf.transformer.ln_f.weight.mul_(20)
        model = GPT.from_hf(hf, dropout=0.0).to(device=device, dtype=dtype).eval()
        hf = hf.to(device=device, dtype=dtype)
    else:
        from parallax.models import GPTConfig

        hf = None
        model = GPT(GPTConfig(n_layer=setup.n_layer, n_embd=setup.n_embd, n_head=setup.n_head,
                              block_size=setup.context, vocab_size=setup.vocab, dropout=0.0))
        with torch.no_grad():
            model.transformer.ln_f.weight.mul_(20)  # as for the HF weights above
        model = model.to(device=device, dtype=dtype).eval()
    requests = make_requests(workload, setup.vocab, setup.context)
    model_desc = (f"GPT-2 arch {setup.n_layer}L x {setup.n_embd}, vocab {setup.vocab}, context {setup.context}, "
                  f"{model.num_params(non_embedding=False) / 1e6:.1f}M params, {str(dtype).removeprefix('torch.')}")
    ctx.note("model", model_desc + " (random weights, same for every engine)")
    prompt_lens, out_lens = [len(p) for p, _ in requests], [n for _, n in requests]
    ctx.note("workload", f"{len(requests)} requests at t=0; prompt tokens lognormal(median {workload.prompt_median}, "
                         f"sigma {workload.prompt_sigma}) clipped to {list(workload.prompt_range)}: "
                         f"{_describe(prompt_lens)}; output tokens lognormal(median {workload.output_median}, "
                         f"sigma {workload.output_sigma}) clipped to {list(workload.output_range)}: "
                         f"{_describe(out_lens)}; seed {workload.seed}; greedy, end-of-text ignored")

    ctx.log(f"{model_desc}; warming up")
    engines = {
        "parallax continuous": lambda: _parallax(model, requests, batch, False, setup.context),
        "parallax static": lambda: _parallax(model, requests, batch, True, setup.context),
    }
    if ctx.args.no_hf or hf is None:
        ctx.skip("HF generate", "--no-hf" if ctx.args.no_hf else "transformers is not installed")
    else:
        subset = requests[:hf_requests] if hf_requests else requests
        if len(subset) < len(requests):
            ctx.note("HF sequential", f"the first {len(subset)} requests only (its tokens/s, TTFT and same-tokens "
                                      "are over those)")
        engines["HF sequential"] = lambda: _hf_sequential(hf, subset, setup.context, device)
        engines["HF padded"] = lambda: _hf_padded(hf, requests, batch, setup.context, device)
    results = _median_runs(ctx, engines, QUICK_REPEATS if ctx.quick else 1)
    ctx.note("engines", f"batch {batch} (max running sequences; static and padded batch size); parallax block size "
                        f"16, {results['parallax continuous']['num_blocks']} KV blocks (the default memory budget), "
                        "max 2048 batched tokens per step, attention "
                        f"{'paged kernels' if device.type == 'cuda' else 'SDPA over gathered K/V'}")

    reference = results.get("HF sequential")
    rates = {}
    for name, r in results.items():
        n = len(r["tokens"])
        out_tokens = sum(out_lens[:n])
        rates[name] = out_tokens / r["wall_s"]
    rows = []
    for name, r in results.items():
        n = len(r["tokens"])
        same = None
        if reference is not None:
            m = min(n, len(reference["tokens"]))
            same = 100.0 * sum(a == b for a, b in zip(r["tokens"][:m], reference["tokens"][:m])) / m
        rows.append({
            "provider": name, "requests": n, "output_tokens": sum(out_lens[:n]), "tokens_per_s": rates[name],
            "ttft_mean_ms": 1e3 * float(np.mean(r["ttft_s"])), "ttft_p99_ms": 1e3 * quantile(r["ttft_s"], 0.99),
            "kv_waste_pct": r["kv_waste_pct"], "contig_waste_pct": r["contig_waste_pct"],
            "vs_static": rates[name] / rates["parallax static"],
            "vs_hf_sequential": rates[name] / rates["HF sequential"] if "HF sequential" in rates else None,
            "same_tokens_pct": same, "preemptions": r.get("preemptions"), "wall_s": r["wall_s"],
            "model": model_desc, "batch": batch,
        })
    if ctx.quick:
        ctx.note("goals", "not judged: a quick run's requests are too few and too short for the goals (KV waste "
                          "at block granularity, throughput ratios) to mean anything; run without --quick")
    else:
        ctx.note("goals", _goals(rows[0]))
    yield from rows

    decode = {}
    for b in setup.decode_batches:
        ctx.log(f"decode batch={b}")
        _decode_rate(model, b, setup.decode_prompt, 4, setup.vocab)  # warm-up at this batch size
        decode[b] = _decode_rate(model, b, setup.decode_prompt, setup.decode_tokens, setup.vocab)
    base = decode[setup.decode_batches[0]]
    for b, d in decode.items():
        yield {"provider": f"decode batch={b}", "requests": b, "output_tokens": d["decoded"],
               "tokens_per_s": d["decoded"] / d["wall_s"], "wall_s": d["wall_s"],
               "vs_batch1": (d["decoded"] / d["wall_s"]) / (base["decoded"] / base["wall_s"]),
               "model": model_desc, "batch": b}
