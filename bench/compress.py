"""Model compression: every method of ``px.compress`` on the same trained demo model, one table.

The base is ``./run.sh train``'s model (the ``tiny`` GPT trained on the built-in corpus; or
``--checkpoint``). Each row starts from a fresh copy of it, applies one method (calibration:
the built-in corpus's training split), writes it with ``px.compress.save`` and loads it back (so
the row measures what a user loads), then reports:

- size on disk (safetensors bytes; torchao rows: ``torch.save`` of the state dict, which is how
  torchao's tensor subclasses are stored) and the number of parameters (logical: a packed int4
  byte holds two; a pruned zero still counts, the ``nonzero`` column says how many are left);
- held-out perplexity: ``px.eval.evaluate`` (what ``parallax eval --tasks`` runs) on a task file
  over the whole held-out split of the built-in corpus (about 47k bytes: the built-in
  ``pydoc_perplexity`` task holds 12k, too few to separate methods a few tenths of a percent
  apart), byte perplexity over rolling windows;
- generation tokens/s on this machine's device through the paged engine (``px.inference.LLM``):
  greedy, ``--gen-tokens`` new tokens for one prompt (batch 1, decode-bound: what weight-only
  quantization is for) and for 16 prompts at once; the median of ``--repeats`` timed runs after a
  warm-up, alternating with runs of the original model so that the speed ratios compare runs
  made at the same time (on 2 shared cores, tokens/s drifts by 2x over minutes);
- the change against the original row (perplexity %, size and tokens/s ratios).

Rows: the original (fp32) and its fp16/bf16 casts; on the bf16 cast (embeddings and norms stay
16-bit, so sizes compare with bf16's), int8 weight-only (RTN) and int4 g128 by RTN and by GPTQ;
W8A8 (dynamic int8 activations, fp32); torchao's ``Int8WeightOnlyConfig`` and
``Int4WeightOnlyConfig`` where they run; magnitude and Wanda 50% unstructured, 2:4 Wanda;
structured pruning of 25% of MLP channels without and with recovery fine-tuning; low rank
(energy 0.9) with recovery; a student of half the depth distilled from the base against the same
student trained without a teacher for the same steps. Goals (the issue's) are judged in the notes.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .table import Column

COLUMNS = [
    Column("method", "method"),
    Column("size_mb", "size [MB]", ".3f"),
    Column("params", "params [M]", ".3f", scale=1e-6),
    Column("nonzero", "nonzero", ".2f"),
    Column("ppl", "held-out ppl", ".4f"),
    Column("ppl_change", "ppl vs orig [%]", "+.2f"),
    Column("size_ratio", "size vs orig [x]", ".3f"),
    Column("tok_s_b1", "tokens/s b1", ",.0f"),
    Column("tok_s_b16", "tokens/s b16", ",.0f"),
    Column("speed_b1", "b1 vs orig [x]", ".2f"),
    Column("speed_b16", "b16 vs orig [x]", ".2f"),
    Column("seconds", "compress [s]", ".1f"),
]

TASK = "pydoc_perplexity"  # its documents' openings are the generation prompts
HELD_OUT = "held_out"
GOAL_INT8_PPL, GOAL_INT8_SIZE = 0.5, 0.55
GOAL_STRUCTURED_PPL, GOAL_STRUCTURED_SPEED = 5.0, 1.15


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="the base model (a checkpoint, run or Hugging Face directory); default: train "
                             "./run.sh train's model into a temporary directory first")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="steps of that training (default: parallax train's default; quick 40)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the rows (default: all)")
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences (default 128, quick 8)")
    parser.add_argument("--recover-steps", type=int, default=None,
                        help="recovery fine-tuning steps after structured pruning / low rank (default 200, quick 4)")
    parser.add_argument("--distill-steps", type=int, default=None,
                        help="training steps of each student (default 600, quick 4)")
    parser.add_argument("--gen-tokens", type=int, default=None, help="new tokens per prompt (default 64, quick 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed generation runs (default 5, quick 1)")


# ------------------------------------------------------------------------------ the rows

def _methods(recover_steps: int) -> dict[str, Callable[[Any, Any, Any], Any]]:
    """Row name -> fn(model, calib, tokenizer) that compresses ``model`` in place; a dict it returns
    (recovery's report, torchao's storage) goes into the row."""
    from parallax import compress

    def recover(model: Any, tokenizer: Any, steps: int) -> dict[str, Any]:
        windows = compress.calibration_tokens(tokenizer, samples=steps * 8, seq_len=model.config.block_size + 1,
                                              seed=1)
        return compress.recover(model, windows, steps=steps, lr=1e-4, batch_size=8)

    def structured_recovered(m: Any, calib: Any, tok: Any) -> dict[str, Any]:
        compress.prune(m, sparsity=0.25, method="structured", calib=calib)
        return recover(m, tok, recover_steps)

    def low_rank_recovered(m: Any, calib: Any, tok: Any) -> dict[str, Any]:
        compress.low_rank(m, energy=0.9)
        return recover(m, tok, recover_steps)

    return {
        "fp16 cast": lambda m, c, t: m.half(),
        "bf16 cast": lambda m, c, t: m.bfloat16(),
        "bf16 + int8 RTN": lambda m, c, t: compress.quantize(m.bfloat16(), bits=8),
        "int8 W8A8": lambda m, c, t: compress.quantize(m, bits=8, activations="int8"),
        "bf16 + int4 g128 RTN": lambda m, c, t: compress.quantize(m.bfloat16(), bits=4, group_size=128),
        "bf16 + int4 g128 GPTQ": lambda m, c, t: compress.quantize(m.bfloat16(), bits=4, group_size=128,
                                                                   method="gptq", calib=c),
        "bf16 + torchao int8 weight-only": lambda m, c, t: _torchao(m.bfloat16(), "Int8WeightOnlyConfig"),
        "bf16 + torchao int4 g128": lambda m, c, t: _torchao(m.bfloat16(), "Int4WeightOnlyConfig", group_size=128),
        "magnitude 50%": lambda m, c, t: compress.prune(m, sparsity=0.5, method="magnitude"),
        "wanda 50%": lambda m, c, t: compress.prune(m, sparsity=0.5, method="wanda", calib=c),
        "wanda 2:4": lambda m, c, t: compress.prune(m, method="2:4", calib=c),
        "structured mlp 25%": lambda m, c, t: compress.prune(m, sparsity=0.25, method="structured", calib=c),
        "structured mlp 25% + recovery": structured_recovered,
        "low rank 0.9 + recovery": low_rank_recovered,
    }


def _torchao(model: Any, config_name: str, **kwargs: Any) -> dict[str, Any]:
    """torchao's weight-only quantization on the same target layers as parallax's (not the head)."""
    import torchao.quantization as tq

    from parallax import compress

    targets = {id(m) for _, m in compress.target_linears(model)}
    tq.quantize_(model, getattr(tq, config_name)(**kwargs), filter_fn=lambda m, _fqn: id(m) in targets)
    return {"stored_by": "torch.save"}


# ------------------------------------------------------------------------------ measurements

def _size_and_reload(model: Any, tokenizer: Any, directory: Path, stored_by: str | None) -> tuple[Any, int]:
    """(the model as a user loads it, bytes on disk)."""
    from parallax import compress

    if stored_by == "torch.save":
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        return model, buffer.getbuffer().nbytes
    compress.save(model, directory, tokenizer=tokenizer)
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return compress.load(directory), size


def _param_counts(model: Any) -> tuple[int, float]:
    """(logical parameters, fraction nonzero) over the model's unique stored tensors."""
    from parallax.compress.common import module_kinds

    kinds = tuple(module_kinds().values())
    packed = {id(m.qweight) for m in model.modules() if isinstance(m, kinds) and getattr(m, "bits", None) == 4}
    seen, total, nonzero = set(), 0, 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or not (t.is_floating_point() or t.dtype in (torch.int8, torch.uint8)):
            continue
        seen.add(id(t))
        factor = 2 if id(t) in packed else 1
        total += t.numel() * factor
        nonzero += t.numel() * factor if factor == 2 or type(t) not in (torch.Tensor, torch.nn.Parameter) \
            else int(torch.count_nonzero(t))  # a packed byte holds no zeros to count; torchao's tensors cannot count
    return total, nonzero / max(total, 1)


def _held_out_task(directory: Path, tokenizer: Any, doc_chars: int = 2000) -> Path:
    """A task file (lm-eval's YAML, ``loglikelihood_rolling``) over the whole held-out split of the
    built-in corpus, as ``parallax train`` splits it for this tokenizer, in documents of about
    ``doc_chars`` characters: ~4x the text of the built-in ``pydoc_perplexity`` task, so that
    differences of a few tenths of a percent between methods are above the noise."""
    import json

    from parallax.data import load_dataset

    data = load_dataset(None, tokenizer=tokenizer)
    text = tokenizer.decode([int(t) for t in data.tokens[data.split_point:]])
    docs = [text[i:i + doc_chars] for i in range(0, len(text), doc_chars)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "held_out.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    task = directory / "held_out.yaml"
    task.write_text(f"task: {HELD_OUT}\ndataset_path: json\n"
                    "dataset_kwargs: {data_files: {test: held_out.jsonl}}\ntest_split: test\n"
                    "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: text\n"
                    "metric_list: [{metric: byte_perplexity}, {metric: word_perplexity}]\n")
    return task


def _perplexity(model: Any, tokenizer: Any, task: Path, limit: int | None) -> float:
    from parallax import eval as px_eval

    results = px_eval.evaluate(model, tokenizer, [str(task)], limit=limit, batch_size=8)
    return float(results["results"][HELD_OUT]["byte_perplexity"])


def _tokens_per_s(models: list[Any], tokenizer: Any, prompts: list[str], gen_tokens: int, repeats: int,
                  device: torch.device) -> list[float]:
    """Median generated tokens/s of greedy decoding for ``prompts`` at once through the paged
    engine, for each model; the models' runs alternate, so drift of the machine (frequency,
    neighbours) affects all of them alike and their ratio stays fair."""
    from parallax.inference import LLM, SamplingParams

    engines = [LLM(model.to(device), tokenizer=tokenizer, max_num_seqs=len(prompts)) for model in models]
    params = SamplingParams(max_tokens=gen_tokens, temperature=0.0)
    for llm in engines:
        llm.generate(prompts, params, use_tqdm=False)  # warm-up: allocation, first-call costs
    rates: list[list[float]] = [[] for _ in engines]
    for _ in range(repeats):
        for llm, rate in zip(engines, rates):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate.append(sum(len(s.token_ids) for o in outputs for s in o.outputs) / (time.perf_counter() - start))
    return [statistics.median(rate) for rate in rates]


def _prompts(count: int) -> list[str]:
    """Openings of held-out documents of the perplexity task (what the model should continue)."""
    import json

    from parallax.eval.builtin import BUILTIN_DIR

    lines = (BUILTIN_DIR / f"{TASK}.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"][:48] for line in lines]
    return [texts[i % len(texts)] for i in range(count)]


# ------------------------------------------------------------------------------ base and distillation

def _train_base(out: Path, steps: int | None) -> Path:
    command = [sys.executable, "-m", "parallax", "train", "--out", str(out)]
    _run_quietly(command + ([] if steps is None else ["--steps", str(steps)]))
    return out


def _run_quietly(command: list[str]) -> None:
    """Run a parallax command; its output only when it fails (progress bars would fill the log)."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def _distill_rows(base: str, root: Path, steps: int, measure: Callable[..., dict]) -> Iterator[dict]:
    """A GPT student of half the base's depth (same width) trained for ``steps`` from the same
    initialisation and batches: by ``parallax train`` (no teacher) and by ``parallax distill`` with the
    base as teacher (alpha 0.5, temperature 1: the setting that won at 150, 300 and 600 steps)."""
    from parallax.train.model_source import load_trained

    teacher, _, _ = load_trained(base)
    config = teacher.config
    shape = {"n_layer": max(1, config.n_layer // 2), "n_embd": config.n_embd, "n_head": config.n_head,
             "block_size": config.block_size}
    common = [arg for key, value in shape.items() for arg in ("--model", f"{key}={value}")]
    common += ["--steps", str(steps), "--eval-interval", str(steps), "--checkpoint-interval", str(steps),
               "--sample-tokens", "0"]
    runs = (("student (no teacher)", ["train", "--preset", "tiny"]),
            ("student distilled (KD)", ["distill", "--teacher", base, "--student", "tiny", "--alpha", "0.5",
                                        "--temperature", "1"]))
    for name, command in runs:
        out = root / name.replace(" ", "_").strip("()")
        start = time.perf_counter()
        _run_quietly([sys.executable, "-m", "parallax", *command, *common, "--out", str(out)])
        seconds = time.perf_counter() - start
        model, tokenizer, _ = load_trained(str(out))
        yield {**measure(name, model, tokenizer), "seconds": seconds}


# ------------------------------------------------------------------------------ run

def run(ctx: Any) -> Iterator[dict]:
    from parallax import compress
    from parallax.train.model_source import load_trained

    args, quick = ctx.args, ctx.quick
    samples = args.samples or (8 if quick else 128)
    recover_steps = args.recover_steps or (4 if quick else 200)
    distill_steps = args.distill_steps or (4 if quick else 600)
    gen_tokens = args.gen_tokens or (8 if quick else 64)
    repeats = args.repeats or (1 if quick else 5)
    limit = 4 if quick else None
    methods = _methods(recover_steps)
    names = ["original (fp32)", *methods, "student (no teacher)", "student distilled (KD)"]
    chosen = names if args.methods is None else [n.strip() for n in args.methods.split(",")]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; known: {', '.join(names)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = args.checkpoint or str(_train_base(root / "base", 40 if quick and args.train_steps is None
                                                  else args.train_steps))
        model, tokenizer, source = load_trained(base)
        ctx.note("base", f"{source}: {type(model).__name__} {model.config}")
        calib = compress.calibration_tokens(tokenizer, samples=samples, seq_len=model.config.block_size)
        task = _held_out_task(root / "task", tokenizer)
        single, batch = _prompts(1), _prompts(16)
        original: dict[str, Any] = {}

        def measure(name: str, m: Any, tok: Any, stored_by: str | None = None) -> dict[str, Any]:
            """The row of ``m``; its speed ratios come from runs alternating with the original's."""
            m, size = _size_and_reload(m.eval(), tok, root / "out" / name.replace(" ", "_"), stored_by)
            params, nonzero = _param_counts(m)
            row = {"method": name, "size_mb": size / 1e6, "params": params, "nonzero": nonzero,
                   "ppl": _perplexity(m, tok, task, limit)}
            if not original:
                row["tok_s_b1"], = _tokens_per_s([m], tok, single, gen_tokens, repeats, ctx.device)
                row["tok_s_b16"], = _tokens_per_s([m], tok, batch, gen_tokens, repeats, ctx.device)
                return row
            for key, prompts in (("b1", single), ("b16", batch)):
                ours, base_rate = _tokens_per_s([m, model], tok, prompts, gen_tokens, repeats, ctx.device)
                row[f"tok_s_{key}"], row[f"speed_{key}"] = ours, ours / base_rate
            row.update(ppl_change=100 * (row["ppl"] / original["ppl"] - 1),
                       size_ratio=size / 1e6 / original["size_mb"])
            return row

        original.update(measure("original (fp32)", copy.deepcopy(model), tokenizer))
        rows: list[dict[str, Any]] = []

        def judged(row: dict[str, Any]) -> dict[str, Any]:
            """``row``, after the notes (goals) are brought up to date with it, so its record has them."""
            rows.append(row)
            _notes(ctx, {r["method"]: r for r in rows}, samples, recover_steps, distill_steps, gen_tokens, repeats)
            return row

        yield judged(original)
        for name in methods:
            if name not in chosen:
                continue
            candidate = copy.deepcopy(model)
            start = time.perf_counter()
            try:
                result = methods[name](candidate, calib, tokenizer)
            except (ImportError, NotImplementedError, RuntimeError) as exc:
                ctx.skip(name, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            seconds = time.perf_counter() - start
            extra = result if isinstance(result, dict) else {}
            row = {**measure(name, candidate, tokenizer, extra.pop("stored_by", None)), "seconds": seconds,
                   **{f"recover_{key}": value for key, value in extra.items()}}  # recovery's report
            yield judged(row)
        if {"student (no teacher)", "student distilled (KD)"} & set(chosen):
            for row in _distill_rows(base, root, distill_steps, measure):
                yield judged(row)


def _notes(ctx: Any, rows: dict[str, dict], samples: int, recover_steps: int, distill_steps: int, gen_tokens: int,
           repeats: int) -> None:
    ctx.note("method", f"calibration: {samples} windows of the model's context from the built-in corpus's "
                       f"training split; perplexity: px.eval.evaluate (what parallax eval --tasks runs) on the "
                       f"whole held-out split of the built-in corpus (byte perplexity, rolling windows); tokens/s: "
                       f"greedy, {gen_tokens} new tokens, median of {repeats} runs after a warm-up, on "
                       f"{ctx.device}, each row's runs alternating with the original's (the 'vs orig' "
                       f"ratios are from those pairs); recovery: {recover_steps} full fine-tuning steps (AdamW lr 1e-4, 8 windows "
                       f"per step); students: {distill_steps} steps each")
    goals = {}

    def judge(key: str, ok: bool, text: str) -> None:
        goals[key] = f"{text}, {'met' if ok else 'not met'}"

    ref, int8 = rows.get("bf16 cast"), rows.get("bf16 + int8 RTN")
    if ref and int8:
        change = 100 * (int8["ppl"] / ref["ppl"] - 1)
        judge(f"int8 weight-only perplexity within {GOAL_INT8_PPL}% of bf16", abs(change) <= GOAL_INT8_PPL,
              f"{change:+.3f}%")
        ratio = int8["size_mb"] / ref["size_mb"]
        judge(f"int8 weight-only size <= {GOAL_INT8_SIZE}x bf16's", ratio <= GOAL_INT8_SIZE, f"{ratio:.3f}x")
    rtn, gptq = rows.get("bf16 + int4 g128 RTN"), rows.get("bf16 + int4 g128 GPTQ")
    if ref and rtn and gptq:
        up_rtn, up_gptq = rtn["ppl"] - ref["ppl"], gptq["ppl"] - ref["ppl"]
        judge("int4 g128 GPTQ perplexity increase over bf16 <= half of RTN's", up_gptq <= up_rtn / 2,
              f"GPTQ {up_gptq:+.4f} vs RTN {up_rtn:+.4f}")
    structured = rows.get("structured mlp 25% + recovery")
    if structured:
        judge(f"structured 25% MLP + recovery: perplexity within {GOAL_STRUCTURED_PPL}%",
              structured["ppl_change"] <= GOAL_STRUCTURED_PPL, f"{structured['ppl_change']:+.2f}%")
        speed = max(structured["speed_b1"], structured["speed_b16"])
        judge(f"structured 25% MLP: generation tokens/s >= {GOAL_STRUCTURED_SPEED}x on {ctx.device.type}",
              speed >= GOAL_STRUCTURED_SPEED, f"b1 {structured['speed_b1']:.2f}x, b16 {structured['speed_b16']:.2f}x")
    plain, kd = rows.get("student (no teacher)"), rows.get("student distilled (KD)")
    if plain and kd:
        judge("distilled student's perplexity below the same student trained without KD", kd["ppl"] < plain["ppl"],
              f"KD {kd['ppl']:.4f} vs {plain['ppl']:.4f}")
    ctx.note("goals", goals)
