"""Serving over HTTP (``python -m bench serve --http``): ``parallax serve`` against ``transformers serve``
and against the in-process async engine, with an open-loop Poisson load.

Model: a tiny Llama written to a temporary Hugging Face directory (random weights, a byte-level BPE
tokenizer trained on parallax's built-in text), served by every provider from the same files. The
output-head rows of the end-of-text token and of every token that is not printable ASCII are zero:
their logit is exactly 0 while the largest of the other (random, zero-centred) logits is positive
but with probability 2^-vocab, so greedy decoding never ends early and every streamed token is
whole text. Each request therefore generates exactly ``max_tokens`` tokens on every server (the
``short`` column counts those that did not), although neither HTTP server is told to ignore EOS.

Workload: ``bench serve``'s long-tailed (clipped log-normal) prompt and output lengths; prompts are
random printable tokens sent as text (the ids are what the tokenizer makes of that text), greedy,
streamed, ``max_tokens`` = the output length. At each rate of ``--rates`` the requests arrive as a
Poisson process for ``--duration`` seconds (at most ``--max-requests``), the same schedule for
every provider; a provider that does not sustain a rate is not tried at higher ones. ``burst``
rows send ``--burst`` requests at once (capacity), ``repeats`` times (5 on CPU) in back-to-back pairs
of the providers compared; a burst row is the median run, its ratio the median of the pairs' ratios.
``<rate> req/s, paired`` rows do the same at the highest sweep rate both the in-process engine and
parallax serve sustain (a new arrival schedule each pair): the overhead at the same rate.

Providers (subprocesses on free 127.0.0.1 ports, started at once while the in-process engine loads):

* ``parallax serve``: ``python -m parallax serve --hf DIR --lora a1=DIR ... a8=DIR`` (``--max-num-seqs`` =
  ``--batch``; the adapters are random rank-8 LoRA on every linear layer, written with ``px.peft``). The
  sweep's requests name the base: a batch of base tokens skips the adapter kernel, leaving each
  LoraLinear's Python call as the adapters' cost.
* ``in-process``: ``parallax.serve.async_engine.AsyncEngine`` over an ``LLMEngine`` with the same
  configuration and adapters, driven by the same load generator without HTTP (``vs in-proc``:
  parallax serve's throughput over this one's; ``TTFT +``: its TTFT mean minus this one's; ``ITL vs
  in-proc``: its mean ITL over this one's).
* ``transformers serve``: ``transformers serve DIR --continuous-batching`` (its best CPU
  configuration: one ``generate`` at a time otherwise), offline (``HF_HUB_OFFLINE=1``); when it cannot
  start here (another transformers version), the ``skipped`` note says why.
* ``parallax base`` / ``parallax 8 adapters``: bursts on parallax serve, base-only against the same
  requests spread over the adapters (one batch mixes all 8), interleaved (``vs base``).

Servers and the in-process engine run with the same torch thread count (``OMP_NUM_THREADS``):
``--threads``, else ``parallax serve``'s default (on CPU every core but one, left to the HTTP side).
Columns: output tokens/s; achieved request rate (completed / wall); TTFT and ITL (see
``bench.loadgen``) mean and p99; ``engine ITL``: the engine's own mean inter-token latency, from its
metrics (parallax serve's ``/metrics``, the in-process engine's), what of the ITL is the engine's
steps, without HTTP or the load generator; ``ok``: all requests completed with p99 TTFT under 2 s;
``client CPU``:
the load generator's CPU time over the wall time (on few cores it competes with the server).

Goals (the issue's), reported not asserted: parallax serve sustains at least 3x the highest rate
transformers serve sustains; HTTP overhead at most 10% against the in-process engine, judged at the
same rate (mean ITL at the highest rate both sustain) and at capacity (burst throughput, where the
load generator's CPU on the same cores counts against the server: a process busy 10% of one core
slowed the in-process engine by 13% on 2 cores); 8 adapters in one batch keep at least 0.8x the
base's throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .loadgen import LoadRequest, engine_sender, http_sender, poisson_arrivals, run_load, summarize
from .serve import Workload, make_requests
from .table import Column

__all__ = ["COLUMNS", "add_arguments", "run", "write_model_dir", "write_adapters", "ServerProcess",
           "serving_threads"]

COLUMNS = [
    Column("provider", "provider"),
    Column("load", "load"),
    Column("requests", "requests", "d"),
    Column("failed", "failed", "d"),
    Column("short_requests", "short", "d"),
    Column("achieved_rate", "req/s", ".2f"),
    Column("tokens_per_s", "tokens/s", ",.1f"),
    Column("ttft_mean_ms", "TTFT mean [ms]", ",.0f"),
    Column("ttft_p99_ms", "TTFT p99 [ms]", ",.0f"),
    Column("itl_mean_ms", "ITL mean [ms]", ",.1f"),
    Column("itl_p99_ms", "ITL p99 [ms]", ",.1f"),
    Column("engine_itl_ms", "engine ITL [ms]", ",.1f"),
    Column("sustained", "ok"),
    Column("vs_inprocess", "vs in-proc [x]", ".2f"),
    Column("ttft_delta_ms", "TTFT + [ms]", ",.0f"),
    Column("itl_vs_inprocess", "ITL vs in-proc [x]", ".2f"),
    Column("vs_base", "vs base [x]", ".2f"),
    Column("client_cpu_pct", "client CPU [%]", ".0f"),
    Column("wall_s", "wall [s]", ".1f"),
]

TTFT_LIMIT_S = 2.0
GOAL_VS_TRANSFORMERS = 3.0
GOAL_OVERHEAD = 0.10
GOAL_ADAPTERS = 0.8
EOS = "<|endoftext|>"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class HttpSetup:
    """Model (Llama architecture), server and load sizes for one device and mode."""

    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    intermediate: int
    context: int
    vocab: int
    batch: int  # max running sequences (parallax --max-num-seqs)
    rates: tuple[float, ...]
    duration_s: float
    max_requests: int
    burst: int
    adapters: int
    lora_rank: int
    repeats: int  # burst runs per provider (median; comparisons: median of back-to-back pairs)
    transformers_cb: bool  # transformers serve --continuous-batching (its start-up takes ~10 s longer)
    start_timeout_s: float
    workload: Workload


# CPU: bench serve's CPU sizes (4 x 256, context 1024, its workload), a 2048-token BPE; parallax serve's
# default --max-num-seqs 256 (with 64 seats the ~100 requests in flight at 24 req/s queued: TTFT p99 3.3 s).
CPU = HttpSetup(n_layer=4, n_embd=256, n_head=4, n_kv_head=4, intermediate=688, context=1024, vocab=2048,
                batch=256, rates=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64), duration_s=15, max_requests=160, burst=64, adapters=8,
                lora_rank=8, repeats=5, transformers_cb=True, start_timeout_s=300,
                workload=Workload(num_requests=160, prompt_median=64, prompt_sigma=1.0, prompt_range=(4, 512),
                                  output_median=96, output_sigma=1.0, output_range=(4, 384)))
CUDA = replace(CPU, n_layer=12, n_embd=768, n_head=12, n_kv_head=12, intermediate=2048, batch=256,
               rates=(1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64), max_requests=512, burst=128,
               workload=Workload(num_requests=512, prompt_median=100, prompt_sigma=1.0, prompt_range=(4, 768),
                                 output_median=200, output_sigma=1.0, output_range=(4, 512)))
QUICK = HttpSetup(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate=128, context=256, vocab=512, batch=8,
                  rates=(4,), duration_s=1.5, max_requests=8, burst=8, adapters=8, lora_rank=4, repeats=1, transformers_cb=False,
                  start_timeout_s=120,
                  workload=Workload(num_requests=8, prompt_median=12, prompt_sigma=0.8, prompt_range=(2, 48),
                                    output_median=8, output_sigma=0.8, output_range=(2, 24)))


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    """The options of ``bench serve --http`` (``--batch`` and ``--no-hf`` are ``bench serve``'s)."""
    parser.add_argument("--rates", type=_rates, default=None,
                        help="--http: request rates (req/s, comma-separated; default "
                        f"{','.join(f'{r:g}' for r in CPU.rates)} on CPU)")
    parser.add_argument("--duration", type=float, default=None,
                        help="--http: seconds of Poisson arrivals per rate (default 15; --quick 1.5)")
    parser.add_argument("--max-requests", type=int, default=None, help="--http: most requests per rate")
    parser.add_argument("--burst", type=int, default=None,
                        help="--http: requests sent at once for the capacity rows (overhead, adapters)")
    parser.add_argument("--adapters", type=int, default=None,
                        help="--http: LoRA adapters of the mixed-adapter rows (default 8; 0: no adapter rows)")


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rates: expected comma-separated numbers, got {text!r}") from None
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise argparse.ArgumentTypeError(f"--rates: expected positive finite rates, got {text!r}")
    return tuple(sorted(rates))


# ---------------------------------------------------------------------------------------------------------------------
# the model directory and adapters


def _printable(text: str) -> bool:
    return bool(text) and text.isascii() and all(c.isprintable() or c in " \n\t" for c in text)


def write_model_dir(path: Path, setup: HttpSetup, seed: int = 0) -> tuple[Any, list[int]]:
    """A Hugging Face Llama directory at ``path``: config.json, generation_config.json and
    model.safetensors as ``LlamaForCausalLM.save_pretrained`` writes them (HF's initialisation: normal
    std 0.02, norms 1), tokenizer.json and tokenizer_config.json. Returns (the ``tokenizers.Tokenizer``,
    the ids the model can generate: printable ASCII, not special; every other id has a zero
    output-head row). Written without importing transformers' model code, which alone took 8 s of
    this quick run's 40 s on a busy 2-core machine; transformers serve loads the directory."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from parallax.data import builtin_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=setup.vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(builtin_documents(), trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "model_max_length": setup.context}))
    vocab, eos = tok.get_vocab_size(), tok.token_to_id(EOS)
    allowed = [i for i in range(vocab) if i != eos and _printable(tok.decode([i]))]
    head_dim = setup.n_embd // setup.n_head
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": setup.n_embd, "intermediate_size": setup.intermediate, "num_hidden_layers": setup.n_layer,
        "num_attention_heads": setup.n_head, "num_key_value_heads": setup.n_kv_head, "head_dim": head_dim,
        "max_position_embeddings": setup.context, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": eos, "eos_token_id": eos, "torch_dtype": "float32", "initializer_range": 0.02,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": eos, "eos_token_id": eos}))
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * config["initializer_range"]

    d, kv = setup.n_embd, setup.n_kv_head * head_dim
    tensors = {"model.embed_tokens.weight": normal(vocab, d), "model.norm.weight": torch.ones(d)}
    for i in range(setup.n_layer):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": normal(setup.n_head * head_dim, d), p + "self_attn.k_proj.weight": normal(kv, d),
            p + "self_attn.v_proj.weight": normal(kv, d), p + "self_attn.o_proj.weight": normal(d, setup.n_head * head_dim),
            p + "mlp.gate_proj.weight": normal(setup.intermediate, d), p + "mlp.up_proj.weight": normal(setup.intermediate, d),
            p + "mlp.down_proj.weight": normal(d, setup.intermediate),
            p + "input_layernorm.weight": torch.ones(d), p + "post_attention_layernorm.weight": torch.ones(d),
        })
    head = normal(vocab, d)
    banned = torch.ones(vocab, dtype=torch.bool)
    banned[allowed] = False
    head[banned] = 0.0
    tensors["lm_head.weight"] = head
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return tok, allowed


def write_adapters(model_dir: Path, out_dir: Path, count: int, rank: int, seed: int = 1) -> dict[str, Path]:
    """``count`` random LoRA adapters (every linear layer, rank ``rank``, non-zero A and B) on the
    model of ``model_dir``, in PEFT's format, written with ``px.peft``; name -> directory."""
    from parallax import peft
    from parallax.models import from_hf

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(from_hf(str(model_dir)), config, adapter_name="a1")
    for i in range(2, count + 1):
        model.add_adapter(f"a{i}", config)
    dirs = {}
    for i in range(1, count + 1):
        dirs[f"a{i}"] = out_dir / f"a{i}"
        model.save_adapter(dirs[f"a{i}"], f"a{i}", base_model_name_or_path=str(model_dir))
    return dirs


def build_requests(tok: Any, allowed: list[int], workload: Workload, context: int, seed: int = 0) -> list[LoadRequest]:
    """bench serve's long-tailed lengths; each prompt is random allowed tokens decoded to text, its
    ids what the tokenizer makes of that text; prompt + output fit ``context``."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for ids, n in make_requests(workload, len(allowed), context):
        text = tok.decode([allowed[i] for i in rng.integers(0, len(allowed), len(ids))])
        prompt_ids = tok.encode(text).ids
        out.append(LoadRequest(prompt=text, prompt_ids=prompt_ids, max_tokens=max(1, min(n, context - len(prompt_ids) - 1))))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# server processes


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started as a subprocess in its own session (its output in ``log_path``), polled
    on ``/health`` until it answers, stopped with SIGTERM to its process group (SIGKILL after
    ``stop_timeout`` seconds)."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path, env: dict[str, str]) -> None:
        self.name, self.port, self.log_path = name, port, log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.started = time.perf_counter()
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                     start_new_session=True)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from start until ``GET /health`` answered 200; RuntimeError (with the log's tail)
        if the process exits or ``timeout_s`` passes first."""
        deadline = self.started + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} before it was ready:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - self.started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def terminate(self) -> None:
        """SIGTERM to the server's process group (its children too); ``stop`` waits for it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, stop_timeout: float = 15.0) -> None:
        self.terminate()
        try:
            self.proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._log.close()


def _server_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # the servers import this checkout's parallax, with the bench's thread count, and nothing is downloaded
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _parallax_cmd(model_dir: Path, port: int | str, batch: int, device: str, loras: dict[str, Path]) -> list[str]:
    cmd = [sys.executable, "-m", "parallax", "serve", "--hf", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "base", "--max-num-seqs", str(batch), "--device", device]
    for name, path in loras.items():
        cmd += ["--lora", f"{name}={path}"]
    return cmd


def _transformers_cmd(model_dir: Path, port: int | str, device: str, continuous_batching: bool) -> list[str]:
    # --continuous-batching: without it transformers serve runs one generate() at a time
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--continuous-batching" if continuous_batching else "--no-continuous-batching",
            "--device", device, "--log-level", "warning"]


# ---------------------------------------------------------------------------------------------------------------------
# the run


def _in_process_engine(model_dir: Path, batch: int, device: torch.device, loras: dict[str, Path]) -> Any:
    """An AsyncEngine as ``parallax serve --hf DIR --max-num-seqs batch --lora NAME=DIR ...`` builds one."""
    from parallax.inference import EngineConfig, LLMEngine
    from parallax.serve.async_engine import AsyncEngine
    from parallax.train.model_source import load_trained

    model, tokenizer, _ = load_trained(hf=str(model_dir))
    engine = LLMEngine(model.to(device).eval(), tokenizer, EngineConfig(max_num_seqs=batch))
    for name, path in loras.items():
        engine.add_lora(name, path)
    return AsyncEngine(engine)


def _load_label(rate: float) -> str:
    return "burst" if math.isinf(rate) else f"{rate:g} req/s"


_ITL_TOTAL = re.compile(r"^parallax:inter_token_latency_seconds_(sum|count) (\S+)$", re.M)


def _itl_totals(metrics: str) -> tuple[float, float]:
    """(seconds, outputs) of the inter-token latency histogram in a Prometheus text: the engine's own
    measure, stamped in its thread as each step's outputs come (no HTTP, no load generator in it)."""
    found = dict(_ITL_TOTAL.findall(metrics))
    return float(found.get("sum", 0.0)), float(found.get("count", 0.0))


def _scrape(base_url: str) -> Callable[[], str]:
    def get() -> str:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as reply:
            return reply.read().decode()
    return get


class _Bench:
    """The providers and the event loop every measurement runs on."""

    def __init__(self, ctx: Any, setup: HttpSetup, requests: list[LoadRequest]) -> None:
        self.ctx, self.setup, self.requests = ctx, setup, requests
        self.loop = asyncio.new_event_loop()
        self.senders: dict[str, Any] = {}
        # provider -> its engine's Prometheus text (parallax serve's /metrics, the in-process engine's)
        self.metrics: dict[str, Callable[[], str]] = {}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def measure(self, provider: str, rate: float, requests: list[LoadRequest], model: str | list[str] | None,
                seed: int = 0) -> dict[str, Any]:
        """One provider at one rate: the row's measurements (see ``loadgen.summarize``)."""
        if isinstance(model, list):
            reqs = [replace(r, model=model[i % len(model)]) for i, r in enumerate(requests)]
        else:
            reqs = [replace(r, model=model) for r in requests]
        arrivals = poisson_arrivals(len(reqs), rate, seed)
        # a sustained rate drains in seconds (its last request: TTFT < 2 s + at most 384 tokens at tens of ms)
        timeout = arrivals[-1] + max(30.0, 2 * self.setup.duration_s)
        self.ctx.log(f"{provider}: {len(reqs)} requests, {_load_label(rate)}")
        scrape = self.metrics.get(provider)
        before = _itl_totals(scrape()) if scrape else None
        cpu = time.process_time()
        results, wall = self.run(run_load(self.senders[provider], reqs, arrivals, timeout_s=timeout))
        cpu = time.process_time() - cpu
        row = summarize(results, wall, reqs)
        if before is not None:
            total, count = (a - b for a, b in zip(_itl_totals(scrape()), before))
            row["engine_itl_ms"] = 1e3 * total / count if count > 0 else None
        if provider != "in-process":  # the load generator's own CPU time, taken from the server's cores
            row["client_cpu_pct"] = 100 * cpu / wall if wall > 0 else None
        row["sustained"] = "yes" if row["failed"] == 0 and row["ttft_p99_ms"] is not None and \
            row["ttft_p99_ms"] < 1e3 * TTFT_LIMIT_S else "no"
        return {"provider": provider, "load": _load_label(rate), "rate": None if math.isinf(rate) else rate, **row}

    def warm_up(self, provider: str, model: str | list[str] | None) -> None:
        short = [replace(r, max_tokens=min(r.max_tokens, 4)) for r in self.requests[: self.setup.batch]]
        self.measure(provider, math.inf, short[:1], model)
        self.measure(provider, math.inf, short, model)

    def close(self) -> None:
        self.loop.close()


def run(ctx: Any) -> Iterator[dict]:
    """The rows of ``bench serve --http`` (see the module docstring)."""
    from importlib.metadata import version

    ctx.add_version("transformers", version("transformers"))
    setup = QUICK if ctx.quick else (CUDA if ctx.device.type == "cuda" else CPU)
    args = ctx.args
    setup = replace(setup, rates=args.rates or setup.rates, duration_s=args.duration or setup.duration_s,
                    max_requests=args.max_requests or setup.max_requests, burst=args.burst or setup.burst,
                    batch=args.batch or setup.batch,
                    adapters=setup.adapters if args.adapters is None else args.adapters)
    if setup.adapters < 0 or setup.max_requests < 1 or setup.burst < 1 or setup.batch < 1 or setup.duration_s <= 0:
        raise ValueError("--adapters must be >= 0, --max-requests, --burst and --batch >= 1, --duration > 0")
    threads = serving_threads(args.threads, ctx.device.type)
    if threads is not None:
        torch.set_num_threads(threads)
        ctx.log(f"{threads} torch threads for every server and the in-process engine (parallax serve's default "
                "on CPU: every core but one; --threads to choose)")
    with tempfile.TemporaryDirectory(prefix="bench-serve-http-") as tmp:
        yield from _run(ctx, setup, Path(tmp))


def serving_threads(requested: int | None, device_type: str) -> int | None:
    """The torch threads of every provider when ``--threads`` is not given: what ``parallax serve``
    takes by default (every core but one on CPU), so that the servers run as users run them and the
    in-process engine, with as many, measures the overhead of HTTP alone. None: keep torch's."""
    if requested is not None:
        return None  # the harness set them
    from parallax.serve.cli import available_cores, engine_threads

    return engine_threads(None, device_type, available_cores(), dict(os.environ))


def _run(ctx: Any, setup: HttpSetup, tmp: Path) -> Iterator[dict]:
    model_dir = tmp / "model"
    threads, device = torch.get_num_threads(), ctx.device.type
    env = _server_env(threads)
    servers: dict[str, ServerProcess] = {}
    bench = engine = None
    try:
        tok, allowed = write_model_dir(model_dir, setup)
        # each server starts as soon as its files exist: their start-ups (imports, weights, warm-up; transformers
        # serve's is the longest) overlap each other and the rest of the preparation
        if ctx.args.no_hf:
            ctx.skip("transformers serve", "--no-hf")
        else:
            servers["transformers serve"] = _start(
                "transformers serve", _transformers_cmd(model_dir, "{port}", device, setup.transformers_cb), tmp, env)
        loras = write_adapters(model_dir, tmp / "adapters", setup.adapters, setup.lora_rank) if setup.adapters else {}
        servers["parallax serve"] = _start("parallax serve", _parallax_cmd(model_dir, "{port}", setup.batch, device,
                                                                           loras), tmp, env)
        requests = build_requests(tok, allowed, replace(setup.workload, num_requests=max(setup.max_requests,
                                                                                          setup.burst)), setup.context)
        ctx.note("model", f"Llama arch {setup.n_layer}L x {setup.n_embd} ({setup.n_head} heads, {setup.n_kv_head} KV "
                          f"heads), vocab {tok.get_vocab_size()}, context {setup.context}, fp32, random weights (the "
                          "same files for every server)")
        ctx.note("workload", _describe_workload(setup, requests))
        bench = _Bench(ctx, setup, requests)
        engine = _in_process_engine(model_dir, setup.batch, ctx.device, loras)
        bench.run(_call(engine.start))
        bench.senders["in-process"] = engine_sender(engine)
        bench.metrics["in-process"] = lambda: engine.metrics.render().decode()
        startup = {}
        for name, server in list(servers.items()):
            try:
                startup[name] = round(server.wait_ready(setup.start_timeout_s), 1)
            except RuntimeError as exc:
                if name != "transformers serve":
                    raise
                # the baseline (another library's CLI) cannot run here: the parallax rows still mean something
                servers.pop(name).stop()
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                ctx.skip(name, " | ".join([lines[0], *lines[1:][-4:]])[:800])
        ctx.note("startup_s", startup)
        ctx.note("servers", _describe_servers(setup, threads))
        for name in ("parallax serve", "transformers serve"):
            if name in servers:
                bench.senders[name] = http_sender(servers[name].base_url)
        bench.metrics["parallax serve"] = _scrape(servers["parallax serve"].base_url)
        models = {"in-process": None, "parallax serve": "base", "transformers serve": str(model_dir)}
        order = [p for p in models if p in bench.senders]
        for provider in order:
            ctx.log(f"{provider}: warm-up")
            bench.warm_up(provider, models[provider])

        rows: list[dict] = []
        for row in _sweep(bench, setup, order, models):
            rows.append(row)
            yield row
        if "transformers serve" in servers:  # done: its CPU time goes back to the others
            servers.pop("transformers serve").stop()
        last = list(_same_rate_pairs(bench, setup, models, rows))
        last += _bursts(bench, setup, models)
        bench.run(engine.shutdown(10.0))
        engine = None
        if loras:
            url = servers["parallax serve"].base_url
            bench.senders["parallax base"] = bench.senders[f"parallax {len(loras)} adapters"] = \
                http_sender(url)
            bench.warm_up("parallax base", list(loras))
            last += _adapter_rows(bench, setup, list(loras))
        # the notes that judge the whole run go into the last records
        ctx.note("sustainable_rate", _sustainable(rows + last, setup))
        ctx.note("goals", _goals(rows + last, setup, ctx.quick, len(loras)))
        yield from last
    finally:
        for server in servers.values():  # all at once: their shutdowns overlap
            server.terminate()
        for server in servers.values():
            server.stop()
        if bench is not None:
            if engine is not None:
                bench.run(engine.shutdown(1.0))
            bench.close()


async def _call(fn: Any) -> Any:
    return fn()


def _start(name: str, cmd: list[str], tmp: Path, env: dict[str, str]) -> ServerProcess:
    port = free_port()
    cmd = [c.replace("{port}", str(port)) for c in cmd]
    return ServerProcess(name, cmd, port, tmp / f"{name.replace(' ', '_')}.log", env)


def _requests_at(setup: HttpSetup, rate: float) -> int:
    return max(2, min(setup.max_requests, round(rate * setup.duration_s)))


def _sweep(bench: _Bench, setup: HttpSetup, order: list[str], models: dict[str, str | None]) -> Iterator[dict]:
    """Each rate in turn, the providers interleaved (in-process first: parallax serve's row carries
    the comparison); a provider stops at the first rate it does not sustain."""
    active = list(order)
    for i, rate in enumerate(setup.rates):
        reqs = bench.requests[:_requests_at(setup, rate)]
        inproc = None
        for provider in list(active):
            row = bench.measure(provider, rate, reqs, models[provider], seed=i)
            if provider == "in-process":
                inproc = row
            elif provider == "parallax serve" and inproc is not None:
                row.update(_vs_inprocess(row, inproc))
            if row["sustained"] != "yes":
                active.remove(provider)
                bench.ctx.log(f"{provider} does not sustain {rate:g} req/s: not tried at higher rates")
            yield row
        if not active:
            break


def _vs_inprocess(row: dict, inproc: dict) -> dict:
    if not row["tokens_per_s"] or not inproc["tokens_per_s"] or row["ttft_mean_ms"] is None:
        return {}
    out = {"vs_inprocess": row["tokens_per_s"] / inproc["tokens_per_s"],
           "ttft_delta_ms": row["ttft_mean_ms"] - inproc["ttft_mean_ms"]}
    if row["itl_mean_ms"] and inproc["itl_mean_ms"]:
        out["itl_vs_inprocess"] = row["itl_mean_ms"] / inproc["itl_mean_ms"]
    return out


def _median(rows: list[dict]) -> dict:
    return sorted(rows, key=lambda r: r["tokens_per_s"] or 0.0)[len(rows) // 2]


def _paired(rows: list[dict], baselines: list[dict]) -> dict:
    """The median run of ``rows`` with its comparison to ``baselines`` (run in pairs, back to back):
    the median of the pairs' throughput ratios and TTFT differences. On a shared 2-core VM whole
    minutes ran up to 1.6x slower; a pair shares its minute, so its ratio keeps what the separate
    medians lose."""
    pairs = [(r, b) for r, b in zip(rows, baselines) if r["tokens_per_s"] and b["tokens_per_s"]]
    out = dict(_median(rows))
    if pairs:
        out["vs_inprocess"] = float(np.median([r["tokens_per_s"] / b["tokens_per_s"] for r, b in pairs]))
        deltas = [r["ttft_mean_ms"] - b["ttft_mean_ms"] for r, b in pairs
                  if r["ttft_mean_ms"] is not None and b["ttft_mean_ms"] is not None]
        out["ttft_delta_ms"] = float(np.median(deltas)) if deltas else None
        for key, out_key in (("itl_mean_ms", "itl_vs_inprocess"), ("engine_itl_ms", "engine_itl_vs_inprocess")):
            ratios = [r[key] / b[key] for r, b in pairs if r.get(key) and b.get(key)]
            if ratios:
                out[out_key] = float(np.median(ratios))
    return out


def _same_rate_pairs(bench: _Bench, setup: HttpSetup, models: dict[str, str | None],
                     rows: list[dict]) -> Iterator[dict]:
    """The overhead at the same rate: at the highest sweep rate both sustain, ``repeats`` back-to-back
    pairs (in process, then parallax serve; a new arrival schedule each pair), load "<rate> req/s,
    paired"; the in-process median run, then parallax serve's compared pair by pair (one sweep row
    each ran 1.25x to 1.45x apart in two runs of the same code)."""
    same = _same_rate(rows)
    if same is None or setup.repeats < 2:
        return
    rate = same[0]
    reqs = bench.requests[:_requests_at(setup, rate)]
    runs: dict[str, list[dict]] = {"in-process": [], "parallax serve": []}
    for seed in range(setup.repeats):
        for provider in runs:
            runs[provider].append(bench.measure(provider, rate, reqs, models[provider], seed=seed + 1))
    label = f"{rate:g} req/s, paired"
    yield {**_median(runs["in-process"]), "load": label}
    yield {**_paired(runs["parallax serve"], runs["in-process"]), "load": label}


def _bursts(bench: _Bench, setup: HttpSetup, models: dict[str, str | None]) -> Iterator[dict]:
    """Capacity: ``setup.burst`` requests at once, in process and over HTTP, interleaved ``repeats``
    times; the median run of each, parallax serve's compared pair by pair."""
    reqs = bench.requests[:setup.burst]
    runs: dict[str, list[dict]] = {"in-process": [], "parallax serve": []}
    for _ in range(setup.repeats):
        for provider in runs:
            runs[provider].append(bench.measure(provider, math.inf, reqs, models[provider]))
    yield _median(runs["in-process"])
    yield _paired(runs["parallax serve"], runs["in-process"])


def _adapter_rows(bench: _Bench, setup: HttpSetup, names: list[str]) -> list[dict]:
    """One burst on parallax serve: base-only against spread over every adapter, interleaved."""
    reqs = bench.requests[:setup.burst]
    mixed = f"parallax {len(names)} adapters"
    runs: dict[str, list[dict]] = {"parallax base": [], mixed: []}
    for _ in range(setup.repeats):
        runs["parallax base"].append(bench.measure("parallax base", math.inf, reqs, "base"))
        runs[mixed].append(bench.measure(mixed, math.inf, reqs, names))
    lora = _paired(runs[mixed], runs["parallax base"])
    lora.pop("ttft_delta_ms", None)
    lora.pop("itl_vs_inprocess", None)
    if "vs_inprocess" in lora:
        lora["vs_base"] = lora.pop("vs_inprocess")
    return [_median(runs["parallax base"]), lora]


def _max_sustained(rows: list[dict], provider: str) -> float | None:
    rates = [r["rate"] for r in rows if r["provider"] == provider and r["rate"] is not None and r["sustained"] == "yes"]
    return max(rates) if rates else None


def _sustainable(rows: list[dict], setup: HttpSetup) -> dict[str, str]:
    out = {}
    for provider in ("parallax serve", "in-process", "transformers serve"):
        if not any(r["provider"] == provider for r in rows):
            continue
        best = _max_sustained(rows, provider)
        out[provider] = (f"{best:g} req/s" if best is not None else
                         f"none of the rates (lowest tried {setup.rates[0]:g} req/s)")
    return out


def _same_rate(rows: list[dict]) -> tuple[float, dict, dict] | None:
    """(rate, parallax serve's row, the in-process row) at the highest sweep rate both sustain."""
    def sustained(provider: str) -> dict[float, dict]:
        return {r["rate"]: r for r in rows if r["provider"] == provider and r["rate"] is not None
                and r["sustained"] == "yes" and r.get("itl_mean_ms")}
    http, inproc = sustained("parallax serve"), sustained("in-process")
    both = sorted(set(http) & set(inproc))
    return (both[-1], http[both[-1]], inproc[both[-1]]) if both else None


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _goals(rows: list[dict], setup: HttpSetup, quick: bool, adapters: int) -> dict[str, str] | str:
    if quick:
        return ("not judged: a quick run's few short requests at one rate say nothing about sustainable rates, "
                "overhead or adapters; run without --quick")
    goals = {}
    ours, theirs = _max_sustained(rows, "parallax serve"), _max_sustained(rows, "transformers serve")
    key = f"sustainable rate >= {GOAL_VS_TRANSFORMERS:g}x transformers serve's (p99 TTFT < {TTFT_LIMIT_S:g} s)"
    if not any(r["provider"] == "transformers serve" for r in rows):
        goals[key] = "not measured (--no-hf)"
    elif theirs is None:
        goals[key] = (f"transformers serve sustains none of the rates; parallax serve {ours or 0:g} req/s: lower "
                      f"rates (--rates) give the ratio")
    elif ours is None:
        goals[key] = f"parallax serve sustains none of the rates, transformers serve {theirs:g} req/s: NOT met"
    elif theirs == max(setup.rates):
        goals[key] = (f"not judged: transformers serve sustains the highest rate tried ({theirs:g} req/s); "
                      "higher --rates give the ratio")
    else:
        ratio = ours / theirs
        capped = " (at least: parallax serve sustains the highest rate tried)" if ours == max(setup.rates) else ""
        met = ratio >= GOAL_VS_TRANSFORMERS
        goals[key] = (f"{ours:g} vs {theirs:g} req/s = {ratio:.2f}x{capped}, "
                      f"{_verdict(met) if met or not capped else 'not judged: higher --rates may meet it'}")
    same = _same_rate(rows)
    paired = next((r for r in rows if r["provider"] == "parallax serve" and r["load"].endswith(", paired")
                   and r.get("itl_vs_inprocess") is not None), None)
    key = f"HTTP overhead <= {GOAL_OVERHEAD:.0%} at the same rate (mean ITL at the highest rate both sustain)"
    if paired is not None:
        overhead = paired["itl_vs_inprocess"] - 1
        engine_part = paired.get("engine_itl_vs_inprocess")
        goals[key] = (f"{paired['load']}: {overhead:+.1%} (median of {setup.repeats} pairs; the engine's own "
                      f"ITL {engine_part - 1 if engine_part else float('nan'):+.1%}; TTFT mean "
                      f"{paired['ttft_delta_ms']:+.0f} ms; load generator {paired.get('client_cpu_pct') or 0:.0f}% "
                      f"of a core), {_verdict(overhead <= GOAL_OVERHEAD)}")
    elif same is not None:
        rate, http, inproc = same
        overhead = http["itl_mean_ms"] / inproc["itl_mean_ms"] - 1
        goals[key] = (f"{rate:g} req/s: ITL {http['itl_mean_ms']:.1f} vs {inproc['itl_mean_ms']:.1f} ms = "
                      f"{overhead:+.1%} (one run), TTFT mean {http['ttft_mean_ms'] - inproc['ttft_mean_ms']:+.0f} ms, "
                      f"{_verdict(overhead <= GOAL_OVERHEAD)}")
    burst = next((r for r in rows if r["provider"] == "parallax serve" and r["load"] == "burst"), None)
    if burst is not None and burst.get("vs_inprocess") is not None:
        overhead = 1 - burst["vs_inprocess"]
        key = f"HTTP overhead <= {GOAL_OVERHEAD:.0%} at capacity (burst throughput; the load generator shares the cores)"
        goals[key] = (f"{overhead:.1%} (TTFT mean +{burst['ttft_delta_ms']:.0f} ms, load generator "
                      f"{burst.get('client_cpu_pct') or 0:.0f}% of a core), {_verdict(overhead <= GOAL_OVERHEAD)}")
    lora = next((r for r in rows if r["provider"] == f"parallax {adapters} adapters"), None)
    if lora is not None and lora.get("vs_base") is not None:
        goals[f"{adapters} adapters in one batch >= {GOAL_ADAPTERS:g}x base throughput"] = (
            f"{lora['vs_base']:.2f}x, {_verdict(lora['vs_base'] >= GOAL_ADAPTERS)}")
    return goals


def _describe_workload(setup: HttpSetup, requests: list[LoadRequest]) -> str:
    from .serve import _describe

    w = setup.workload
    return (f"Poisson arrivals at {', '.join(f'{r:g}' for r in setup.rates)} req/s for {setup.duration_s:g} s each "
            f"(at most {setup.max_requests} requests; the same schedule for every provider), bursts of {setup.burst}; "
            f"prompt tokens lognormal(median {w.prompt_median}, sigma {w.prompt_sigma}) clipped to "
            f"{list(w.prompt_range)}: {_describe([len(r.prompt_ids) for r in requests])}; output tokens "
            f"lognormal(median {w.output_median}, sigma {w.output_sigma}) clipped to {list(w.output_range)}: "
            f"{_describe([r.max_tokens for r in requests])}; greedy, streamed, seed {w.seed}")


def _describe_servers(setup: HttpSetup, threads: int) -> str:
    tf = ("--continuous-batching (default cache sizes)" if setup.transformers_cb else
          "without --continuous-batching (one generate() at a time: a quick run spares the ~10 s longer start-up)")
    return (f"parallax serve --max-num-seqs {setup.batch}, its engine in a process of its own (the default; the "
            f"in-process engine alike, in a thread of the benchmark's process); transformers serve "
            f"{tf}; {threads} torch threads each (OMP_NUM_THREADS); "
            f"adapters: {setup.adapters} x rank {setup.lora_rank} on every linear layer")
