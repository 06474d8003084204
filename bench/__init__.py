"""parallax benchmarks: ``python -m bench`` lists them, ``python -m bench NAME`` runs one.

Each benchmark is one module ``bench/<name>.py`` listed in ``BENCHMARKS`` below (name ->
(module, one-line description)), so listing never imports torch or a benchmark. A benchmark
module defines:

    COLUMNS: list[bench.table.Column]        # what the printed table shows, units in headers
    def columns(args) -> list[Column]        # optional: the columns for these options (default COLUMNS)
    def run(ctx: bench.runner.Context) -> Iterable[dict]   # yields one row (a flat dict) at a time
    def add_arguments(parser) -> None        # optional: its own command-line options
    def plot(rows: list[dict], path) -> None # optional: what ``--plot`` draws

The runner (``bench.runner``) times nothing itself: benchmarks use ``bench.timing``. It adds
machine, device, versions and git revision to every row, appends it to
``bench/results/<name>.jsonl`` and prints the table (or JSON records with ``--json``).
"""

from __future__ import annotations

__all__ = ["BENCHMARKS", "main"]

BENCHMARKS: dict[str, tuple[str, str]] = {
    "offload": (
        ".offload",
        "optimizer offload: step time with offload='cpu' vs the optimizer on the device (ZeRO-1, bf16)",
    ),
    "adamw": (
        ".adamw",
        "optimizer step: parallax AdamW vs torch foreach/fused (and DeepSpeed CPU Adam), fp32 and bf16+master, "
        "ms, GB/s and the memory-bandwidth floor",
    ),
    "align": (
        ".align",
        "DPO step on a LoRA Llama (CPU): parallax (reference = adapters disabled, chunked log-probabilities) vs "
        "TRL DPOTrainer + PEFT with the adapter-disabled and an explicit reference model; tokens/s, peak memory",
    ),
    "attention": (
        ".attention",
        "FlashAttention fwd/bwd (bf16, 16k tokens, seqlens 512-16k, D 64/128, causal and not): parallax Triton vs "
        "SDPA flash and math, TFLOP/s and fraction of the measured matmul rate",
    ),
    "checkpointing": (
        ".checkpointing",
        "activation checkpointing on the reference GPT: saved activation bytes and step time, none vs every "
        "block vs every 2nd block",
    ),
    "compress": (
        ".compress",
        "compression of the trained demo model: int8/int4 (RTN, GPTQ) and torchao, pruning (magnitude, Wanda, 2:4, "
        "structured + recovery), low rank, distillation; size, held-out perplexity, generation tokens/s",
    ),
    "eval": (
        ".eval",
        "evaluation: px.eval.evaluate vs lm-evaluation-harness's hf backend on the same model and local tasks "
        "(multiple choice, generation): wall time, requests/s, identical scores",
    ),
    "finetune": (
        ".finetune",
        "LoRA SFT on a Llama (CPU): parallax packed/padded vs TRL SFTTrainer + PEFT packed/padding-free/padded; "
        "trained tokens/s, padding share, peak memory, first-step loss against the base model's",
    ),
    "kernels": (
        ".kernels",
        "fused kernels (linear+cross-entropy, RMSNorm, rotary, SwiGLU) vs the PyTorch composition and Liger-Kernel: "
        "fwd/bwd time and peak memory; int8/int4 weight-only matmuls at decode batches vs bf16 F.linear",
    ),
    "memory": (
        ".memory",
        "per-rank peak memory and step time of fp32/bf16 x ZeRO stage 0-3 x offload x checkpointing on 2 gloo ranks: "
        "measured vs px.planner's prediction and the ZeRO formula",
    ),
    "parallel": (
        ".parallel",
        "tensor (TP=2) and pipeline (PP=2, GPipe/1F1B, m micro-batches) parallelism on gloo: parallax vs "
        "torch.distributed.tensor.parallel and torch.distributed.pipelining, step time; measured pipeline bubble "
        "vs (p-1)/(m+p-1)",
    ),
    "paged_attention": (
        ".paged_attention",
        "PagedAttention decode (GPU: GQA 32/8, D 128, bf16, CUDA and Triton kernels; CPU: the engine's fp32 "
        "shapes, the C++ kernel vs the gather + SDPA path) vs SDPA on a contiguous cache, K/V GB/s as a fraction "
        "of the measured copy bandwidth",
    ),
    "serve": (
        ".serve",
        "serving a long-tailed ShareGPT-like workload: parallax continuous batching (paged KV) vs static batching "
        "vs HF generate sequential and padded; tokens/s, TTFT mean/p99, KV waste; decode batch 64 vs 1; --http: "
        "parallax serve vs transformers serve and the in-process engine under Poisson load, sustainable rate, "
        "HTTP overhead, 8 LoRA adapters vs base",
    ),
    "train": (
        ".train",
        "training step throughput: the parallax train loop vs a plain PyTorch loop on the same model and data "
        "(runtime overhead)",
    ),
    "prep": (
        ".prep",
        "data preparation (Gopher + C4 filters, exact + MinHash dedup, PII) on a generated noisy corpus: parallax "
        "run_prep vs datatrove's LocalPipelineExecutor, same workers; MB/s per core, peak memory, kept-set agreement",
    ),
    "scaling": (
        ".scaling",
        "the planner's step-time model vs published clusters: Megatron-LM 2019 weak scaling (V100, 1-512 GPUs) and "
        "2021 Table 1 (A100, 32-3072 GPUs), predicted vs published and the error; gloo all-reduce fit on this machine",
    ),
    "zero": (
        ".zero",
        "ZeRO data parallelism on 2 gloo ranks: parallax stages 0-3 vs torch DDP and FSDP2, step time, "
        "model-state memory against the ZeRO paper's formula, parameter agreement",
    ),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench`` and ``parallax bench``; returns the exit status."""
    from .runner import main as _main

    return _main(argv)
