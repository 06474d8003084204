"""Scaling: the planner's step-time model against published cluster results (Megatron-LM 2019 and 2021).

What is predicted, and from what:

* the model: ``parallax.planner.cost.step_time`` (compute / (tp pp), tensor-parallel all-reduces
  on the intra-node link, the pipeline bubble (p-1)/(m+p-1) and point-to-point sends, the
  data-parallel all-reduce (hierarchical across nodes), the optimizer step; nothing overlapped)
  with ``gpt_step_flops`` (Narayanan et al. 2021, eq. 3: the FLOPs both papers count);
* the clusters: published hardware figures, named constants below with their sources;
* the one rate no datasheet gives, the sustained matmul rate of a GPU inside a training step,
  is calibrated on ONE published row per paper (marked "calibration": its error is 0 by
  construction) and every other row is a prediction; ``rate needed`` is the rate that would make
  a row exact: where it rises with the model, the GPU ran its larger matmuls faster than the
  calibration row's (the model keeps one rate for all sizes);
* this machine: the ring all-reduce model's latency and bandwidth are fitted to gloo
  all-reduces between ``--ranks`` local processes (``parallax.planner.calibrate``) and checked on a
  held-out size; the matmul rate (CPU, and bf16 on a GPU when present) is recorded in the notes.

Published results compared (figures confirmed from the papers' text; see ``MEGATRON_2019`` and
``MEGATRON_2021``):

* Shoeybi et al. 2019 (arXiv 1909.08053), Table 1 and Figure 5: weak scaling of GPT-2 models
  from 1.2B parameters on 1 V100 to 8.3B on 8 (model parallel, batch 8) and 64x that with data
  parallelism (global batch 512), efficiency relative to the 1-GPU baseline's 39 TFLOP/s. The
  figure gives 74% at 512 GPUs; the abstract says 76% (15.1 PFLOP/s over the whole
  application): the row uses the figure's 74%, the abstract's 76% is recorded in the notes.
* Narayanan et al. 2021 (arXiv 2104.04473), Table 1: 1.7B to 1T parameters on 32 to 3072 A100s
  with (t, p, d) and the achieved TFLOP/s per GPU. Assumptions where the table is silent:
  micro-batch size 1, the non-interleaved 1F1B schedule, fp16 gradients, scatter/gather
  pipeline sends (1/t per rank, section 4.1 of the paper).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterator
from dataclasses import dataclass

from .table import Column

COLUMNS = [
    Column("suite", "suite"),
    Column("model", "model"),
    Column("gpus", "GPUs", "d"),
    Column("tp", "t", "d"),
    Column("pp", "p", "d"),
    Column("dp", "d", "d"),
    Column("micro_batches", "m", "d"),
    Column("metric", "metric"),
    Column("reference", "published/measured", ".3g"),
    Column("predicted", "predicted", ".3g"),
    Column("error_pct", "error [%]", "+.1f"),
    Column("step_s", "step [s]", ".3g"),
    Column("bubble_pct", "bubble [%]", ".1f"),
    Column("comm_pct", "comm [%]", ".1f"),
    Column("implied_tflops", "rate needed [TFLOP/s]", ".0f"),
    Column("role", "role"),
]

# ---------------------------------------------------------------------------------- clusters


@dataclass(frozen=True)
class Cluster:
    """Published per-GPU figures of a cluster (bytes/s per direction)."""

    name: str
    peak_flops_per_s: float
    nvlink_bytes_per_s: float
    infiniband_bytes_per_s: float  # per GPU: the node's adapters / GPUs per node
    hbm_bytes_per_s: float
    gpus_per_node: int


# DGX-2H (Shoeybi et al. 2019, section 5): 16 V100 SXM3 32GB per server, "300 GB/sec bandwidth between
# GPUs inside a server via NVSwitch" (both directions: 150 GB/s each way, V100 NVLink2 6 x 25 GB/s) and
# "100 GB/sec of interconnect bandwidth between servers using 8 InfiniBand adapters" (100 GB/s / 16 GPUs).
# Peak: the paper's baseline 39 TFLOP/s is "30% of the theoretical peak", i.e. 130 TFLOP/s.
# HBM2: 900 GB/s (NVIDIA V100 datasheet).
V100_DGX2H = Cluster("V100 DGX-2H", peak_flops_per_s=39e12 / 0.30, nvlink_bytes_per_s=150e9,
                     infiniband_bytes_per_s=100e9 / 16, hbm_bytes_per_s=900e9, gpus_per_node=16)
# Selene (Narayanan et al. 2021, section 5): DGX A100 80GB nodes, 8 GPUs, NVLink/NVSwitch (A100
# NVLink3: 600 GB/s both directions, 300 GB/s each way), 8 x 200 Gb/s HDR InfiniBand per node
# (one 25 GB/s adapter per GPU); peak 312 TFLOP/s fp16/bf16 (the paper's figure); HBM2e 2039 GB/s
# (NVIDIA A100 80GB SXM datasheet).
A100_SELENE = Cluster("A100 Selene", peak_flops_per_s=312e12, nvlink_bytes_per_s=300e9,
                      infiniband_bytes_per_s=25e9, hbm_bytes_per_s=2039e9, gpus_per_node=8)

VOCAB = 51200  # both papers pad GPT-2's vocabulary to 51,200


@dataclass(frozen=True)
class Run:
    """One published configuration: a GPT and its (t, p, d) mesh and batch."""

    label: str
    params_b: float  # the paper's parameter count (billions)
    hidden: int
    heads: int
    layers: int
    seq: int
    tp: int
    pp: int
    dp: int
    batch: int  # global batch (sequences)
    micro_batch: int  # sequences per micro-batch
    published: float  # efficiency (fraction) for 2019, TFLOP/s per GPU for 2021

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def micro_batches(self) -> int:
        return self.batch // (self.dp * self.micro_batch)


def _v2019(label, params_b, hidden, heads, layers, tp, dp, batch, efficiency) -> Run:
    return Run(label, params_b, hidden, heads, layers, 1024, tp, 1, dp, batch, batch // dp, efficiency)


# Shoeybi et al. 2019, Table 1 (hidden, heads, layers, parameters, model-parallel GPUs, model+data GPUs)
# and Figure 5 (weak scaling efficiency): model parallel 100/95/82/77%, model+data parallel 96/83/79/74%.
# Batch: 8 for model parallel, a global 512 (64-way data parallel) for model+data parallel (section 5.1).
MEGATRON_2019 = (
    _v2019("1.2B", 1.2, 1536, 16, 40, 1, 1, 8, 1.00),
    _v2019("2.5B", 2.5, 1920, 20, 54, 2, 1, 8, 0.95),
    _v2019("4.2B", 4.2, 2304, 24, 64, 4, 1, 8, 0.82),
    _v2019("8.3B", 8.3, 3072, 32, 72, 8, 1, 8, 0.77),
    _v2019("1.2B", 1.2, 1536, 16, 40, 1, 64, 512, 0.96),
    _v2019("2.5B", 2.5, 1920, 20, 54, 2, 64, 512, 0.83),
    _v2019("4.2B", 4.2, 2304, 24, 64, 4, 64, 512, 0.79),
    _v2019("8.3B", 8.3, 3072, 32, 72, 8, 64, 512, 0.74),
)
BASELINE_2019_FLOPS = 39e12  # the 1.2B model on one GPU (section 5.1)
ABSTRACT_2019_EFFICIENCY = 0.76  # the abstract's figure for 8.3B on 512 GPUs (Figure 5 shows 74%)


def _a2021(params_b, heads, hidden, layers, tp, pp, gpus, batch, tflops) -> Run:
    return Run(f"{params_b:g}B", params_b, hidden, heads, layers, 2048, tp, pp, gpus // (tp * pp), batch, 1,
               tflops * 1e12)


# Narayanan et al. 2021, Table 1: parameters (B), heads, hidden, layers, t, p, GPUs, batch, TFLOP/s per GPU
# (sequence length 2048, vocabulary 51,200: section 5).
MEGATRON_2021 = (
    _a2021(1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    _a2021(3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    _a2021(7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    _a2021(18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    _a2021(39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    _a2021(76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    _a2021(145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    _a2021(310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    _a2021(529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    _a2021(1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
)

# ---------------------------------------------------------------------------------- the model


def gpt_params(run: Run) -> float:
    """Parameters of the GPT (Narayanan et al. 2021, section 3.3): 12 l h^2 (1 + 13/(12h) + (V+s)/(12lh))."""
    h, layers = run.hidden, run.layers
    return 12 * layers * h**2 * (1 + 13 / (12 * h) + (VOCAB + run.seq) / (12 * layers * h))


def rank_params(run: Run) -> float:
    """Parameters of the worst rank: its share of the layers split t ways, plus the embeddings (first stage)."""
    h = run.hidden
    return (12 * h**2 + 13 * h) * run.layers / (run.tp * run.pp) + (VOCAB + run.seq) * h / run.tp


def hardware(cluster: Cluster, matmul_flops_per_s: float):
    from parallax.planner import Hardware

    return Hardware(bf16_flops_per_s=matmul_flops_per_s, fp32_flops_per_s=matmul_flops_per_s / 2,
                    network_bytes_per_s=cluster.nvlink_bytes_per_s,
                    inter_node_bytes_per_s=cluster.infiniband_bytes_per_s,
                    memory_bytes_per_s=cluster.hbm_bytes_per_s, ranks_per_node=cluster.gpus_per_node)


def predict(run: Run, cluster: Cluster, matmul_flops_per_s: float):
    """The modelled ``StepTime`` of one training step of ``run`` (fp16, activation recomputation)."""
    from parallax.planner.cost import gpt_step_flops, step_time

    flops = gpt_step_flops(batch=run.micro_batch, seq=run.seq, layers=run.layers, hidden=run.hidden, vocab=VOCAB,
                           recompute=True)
    return step_time(flops=flops, num_params=int(rank_params(run)), world_size=run.dp, stage=0, element_size=2,
                     offload="none", hw=hardware(cluster, matmul_flops_per_s), tp=run.tp, pp=run.pp,
                     micro_batches=run.micro_batches, tokens=run.micro_batch * run.seq, hidden=run.hidden,
                     layers=run.layers, recompute=True, p2p_split=run.tp)


def step_flops(run: Run) -> float:
    """The FLOPs of one step of the global batch, as the papers count them (eq. 3, recomputation)."""
    from parallax.planner.cost import gpt_step_flops

    return gpt_step_flops(batch=run.batch, seq=run.seq, layers=run.layers, hidden=run.hidden, vocab=VOCAB,
                          recompute=True)


def flops_per_gpu(run: Run, cluster: Cluster, matmul_flops_per_s: float) -> float:
    """Predicted achieved FLOP/s per GPU (the papers' metric)."""
    return step_flops(run) / (run.gpus * predict(run, cluster, matmul_flops_per_s).total_s)


def calibrate_matmul_rate(run: Run, cluster: Cluster, achieved_flops_per_gpu: float) -> float:
    """The sustained matmul rate that makes ``run``'s predicted FLOP/s per GPU equal ``achieved_flops_per_gpu``.

    The predicted throughput grows with the rate (compute and the bubble shrink, the rest stays),
    towards a ceiling set by communication and the optimizer: bisection on a log scale.
    """
    lo, hi = 1e9, 1e18
    if flops_per_gpu(run, cluster, hi) < achieved_flops_per_gpu:
        raise ValueError(f"{run.label}: {achieved_flops_per_gpu / 1e12:.0f} TFLOP/s per GPU is more than the model "
                         "allows at any matmul rate (its communication alone takes longer)")
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if flops_per_gpu(run, cluster, mid) < achieved_flops_per_gpu else (lo, mid)
        if hi / lo < 1 + 1e-12:
            break
    return (lo * hi) ** 0.5


def megatron_2019_rows() -> Iterator[dict]:
    """Weak scaling efficiency per row, relative to the 1.2B model on 1 GPU (calibrated to 39 TFLOP/s)."""
    base = MEGATRON_2019[0]
    rate = calibrate_matmul_rate(base, V100_DGX2H, BASELINE_2019_FLOPS)
    base_rate = flops_per_gpu(base, V100_DGX2H, rate)
    for run in MEGATRON_2019:
        efficiency = flops_per_gpu(run, V100_DGX2H, rate) / base_rate
        implied = calibrate_matmul_rate(run, V100_DGX2H, run.published * base_rate)
        yield _row("Megatron-LM 2019 (V100)", run, predict(run, V100_DGX2H, rate), "weak scaling eff. [%]",
                   100 * run.published, 100 * efficiency, "calibration" if run is base else "prediction", implied)


def megatron_2021_rows() -> Iterator[dict]:
    """Achieved TFLOP/s per GPU per row; the rate calibrated on the first (data-parallel only) row."""
    base = MEGATRON_2021[0]
    rate = calibrate_matmul_rate(base, A100_SELENE, base.published)
    for run in MEGATRON_2021:
        achieved = flops_per_gpu(run, A100_SELENE, rate)
        implied = calibrate_matmul_rate(run, A100_SELENE, run.published)
        yield _row("Megatron-LM 2021 (A100)", run, predict(run, A100_SELENE, rate), "TFLOP/s per GPU",
                   run.published / 1e12, achieved / 1e12, "calibration" if run is base else "prediction", implied)


def _row(suite: str, run: Run, t, metric: str, reference: float, predicted: float, role: str,
         implied_rate: float) -> dict:
    return {"implied_tflops": implied_rate / 1e12, "suite": suite, "model": run.label, "gpus": run.gpus, "tp": run.tp, "pp": run.pp, "dp": run.dp,
            "micro_batches": run.micro_batches, "metric": metric, "reference": reference, "predicted": predicted,
            "error_pct": 100 * (predicted - reference) / reference, "step_s": t.total_s,
            "bubble_pct": 100 * t.bubble_s / t.total_s, "comm_pct": 100 * t.comm_s / t.total_s, "role": role}


def median_abs_error(rows: list[dict], suite: str) -> float:
    """Median |error| (%) of a suite's predicted rows (calibration rows excluded)."""
    errors = [abs(r["error_pct"]) for r in rows if r["suite"] == suite and r["role"] == "prediction"]
    return statistics.median(errors)

# ---------------------------------------------------------------------------------- this machine


def _all_reduce_rank(rank: int, world: int, args: dict) -> dict:
    from parallax.planner.calibrate import time_all_reduce

    return {"times": [time_all_reduce(n, repeats=args["repeats"]) for n in args["sizes"]]}


def local_rows(ctx) -> Iterator[dict]:
    """gloo all-reduce on ``--ranks`` local processes: the ring model fitted on all sizes but one, the
    held-out one predicted."""
    import torch

    from parallax.planner.calibrate import fit_ring_all_reduce, matmul_flops_per_s

    from .ranks import spawn_gloo

    world = ctx.args.ranks
    sizes = [2**16, 2**20, 2**22] if ctx.quick else [2**16, 2**18, 2**20, 2**22, 2**24]
    held_out = sizes[-2]
    repeats = 5 if ctx.quick else 7  # medians of 3 let one stall invert the 64 KB and 4 MB times on a busy machine
    results = spawn_gloo(_all_reduce_rank, world, {"rank_threads": 1, "timeout": 120, "sizes": sizes,
                                                   "repeats": repeats}, deadline_s=300)
    times = [max(r["times"][i] for r in results) for i in range(len(sizes))]  # the slower rank
    fit_sizes = [s for s in sizes if s != held_out]
    latency, bandwidth = fit_ring_all_reduce(fit_sizes, [t for s, t in zip(sizes, times) if s != held_out], world)
    ctx.note("this machine", {"gloo all-reduce fit": f"latency {latency * 1e6:.1f} us per ring step, "
                                                     f"{bandwidth / 1e9:.2f} GB/s ({world} ranks)",
                              "matmul fp32 (n=512)": f"{matmul_flops_per_s(512) / 1e9:.1f} GFLOP/s"})
    if torch.cuda.is_available():
        rate = matmul_flops_per_s(8192, torch.bfloat16, "cuda")
        ctx.note("GPU", {torch.cuda.get_device_name(): f"bf16 matmul (n=8192) {rate / 1e12:.0f} TFLOP/s"})
    from parallax.planner.cost import ring_allreduce_s

    for size, measured in zip(sizes, times):
        predicted = ring_allreduce_s(size, world, bandwidth, latency)
        yield {"suite": "this machine (gloo)", "model": f"all-reduce {size / 2**20:g} MiB", "gpus": world,
               "metric": "time [ms]", "reference": 1e3 * measured, "predicted": 1e3 * predicted,
               "error_pct": 100 * (predicted - measured) / measured,
               "role": "prediction" if size == held_out else "fit"}

# ---------------------------------------------------------------------------------- benchmark


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--ranks", type=int, default=2, help="local gloo ranks for the all-reduce fit (default 2)")
    parser.add_argument("--no-local", action="store_true", help="skip this machine's all-reduce measurements")


def run(ctx) -> Iterator[dict]:
    if not ctx.args.no_local:
        yield from local_rows(ctx)
    rows = [*megatron_2019_rows(), *megatron_2021_rows()]
    ctx.note("published", {"Megatron-LM 2019 abstract": f"{100 * ABSTRACT_2019_EFFICIENCY:.0f}% at 512 GPUs "
                                                        "(Figure 5 and section 5.1: 74%, the row's reference)"})
    ctx.note("summary", {suite: f"median |error| {median_abs_error(rows, suite):.1f}% over "
                                f"{sum(r['suite'] == suite and r['role'] == 'prediction' for r in rows)} predicted rows"
                         for suite in ("Megatron-LM 2019 (V100)", "Megatron-LM 2021 (A100)")})
    yield from rows
