"""DPO step throughput and memory: parallax's DPO against TRL's ``DPOTrainer`` with a PEFT LoRA policy.

Every provider trains the same random-initialised ``transformers`` Llama (``bench.lora_setup``:
a BPE tokenizer trained on the built-in corpus; parallax imports it with
``parallax.models.from_hf``) with the same LoRA adapter (r=16, alpha=32, no dropout, all linear
projections; one PEFT adapter directory initialises every provider), the same AdamW (lr, betas,
no weight decay, constant lr, gradient clipping at 1.0) and the same sigmoid DPO loss (beta 0.1)
on the same preference pairs: prompt/chosen/rejected rows of varied lengths (the chosen
completion continues the prompt's passage, the rejected one is another passage's continuation)
rendered once by parallax (``parallax.align.load_preference_pairs``, completion-only targets)
and handed to TRL as a tokenized ``datasets.Dataset`` (``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``),
so every provider trains on identical tokens, ``pairs`` pairs per step in file order.

Providers:

- ``parallax``: ``parallax.align.PreferenceObjective``: the LoRA policy, the reference
  log-probabilities from the same weights with the adapters disabled (no second model), chosen
  and rejected sequences in one forward (``collate_pairs``: 2B right-padded rows, as TRL's),
  log-probabilities computed chunk-wise from the hidden states (the logits never exist);
- ``parallax packed``: the same with ``collate_pairs(packing=True)``: the 2B sequences back to
  back in rows of ``seq`` positions, each attending only within itself (no padding to compute;
  TRL's DPO ``padding_free`` is disabled in this version);
- ``TRL PEFT ref``: ``DPOTrainer`` with the PEFT policy and ``ref_model=None``: the reference
  forward runs the same model with the adapter disabled (TRL copies a pretrained adapter into a
  frozen ``ref`` adapter first; it is deleted, since the initial adapter computes the base model
  exactly as B starts at zero, and a disabled adapter is TRL's cheaper path);
- ``TRL explicit ref``: ``DPOTrainer`` with the PEFT policy and a separate reference model (a
  second copy of the base weights), as for full fine-tuning.

TRL runs with ``precompute_ref_log_probs=False`` (the reference forward is part of every
step), gradient checkpointing off and fp32, as parallax. Each provider runs in a fresh process,
one after the other. Peak memory is the bytes of the weights held (the policy's, adapter
included, and the reference model's when there is one) plus the peak of the training loop over
its start: the resident set size sampled every 5 ms (CUDA: ``torch.cuda.max_memory_allocated``
over the allocation at the start). The weights are counted rather than sampled from before
loading so that what TRL's trainer sets up (accelerate, lazily imported modules) is not charged
to the baselines. Steps are timed from the end of one to the end of the next (collation
included) after the warm-up steps; tokens/s is the median over the timed steps of a step's tokens
(prompt + chosen and prompt + rejected, no padding) over its time: every provider runs the same
steps, and a median is not thrown by the load spikes of a shared machine, as a total is.

Agreement: ``loss0`` is the first step's loss, log 2 = 0.6931 for every provider since B starts
at zero (policy = reference); ``logps0 err`` is the largest difference between a provider's
first-step mean chosen/rejected log-probabilities and the base model's over the same batch,
computed sequence by sequence without padding by ``transformers``; ``margin1`` is the mean
reward margin of the second step (after one update), which the providers share when they take
the same first update.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .lora_setup import (
    LORA_ALPHA,
    LORA_R,
    LR,
    Case,
    PeakMemory,
    StepClock,
    add_versions,
    check_providers,
    clipped_step,
    continuation_rows,
    in_fresh_process,
    make_adapter_dir,
    make_model_dir,
    quiet_hugging_face,
    timing_callback,
    train_quietly,
    trainer_arguments,
)
from .table import Column
from .timing import quantile

COLUMNS = [
    Column("provider", "provider"),
    Column("pairs", "pairs/step", "d"),
    Column("steps", "steps", "d"),
    Column("median_ms", "median [ms/step]", ".0f"),
    Column("tokens_per_s", "tokens/s", ",.0f"),
    Column("vs_trl", "vs TRL PEFT ref [x]", ".2f"),
    Column("weights_mb", "weights [MB]", ",.0f"),
    Column("peak_mb", "peak mem [MB]", ",.0f"),
    Column("memory_vs_explicit", "mem vs TRL explicit ref [x]", ".2f"),
    Column("trainable", "trainable [M]", ".3f", scale=1e-6),
    Column("loss0", "loss0", ".4f"),
    Column("logps0_err", "logps0 err", ".1e"),
    Column("margin1", "margin1", ".4e"),
    Column("final_loss", "final loss", ".4f"),
]

PROVIDERS = ("parallax", "parallax packed", "TRL PEFT ref", "TRL explicit ref")
SPEED_BASELINE, MEMORY_BASELINE = "TRL PEFT ref", "TRL explicit ref"
BETA = 0.1
GOAL_SPEEDUP, GOAL_MEMORY = 1.3, 0.6

FULL = Case(width=512, layers=4, heads=8, kv_heads=4, intermediate=1536, vocab=8192, seq=512, examples=120,
            warmup=3, steps=30)
QUICK = Case(width=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2048, seq=128, examples=16,
             warmup=1, steps=3)
PAIRS_PER_STEP = {"full": 2, "quick": 2}


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--steps", type=int, default=None, help="timed steps per provider (default 30, quick 3)")
    parser.add_argument("--pairs", type=int, default=None, help="preference pairs per step (default 2)")
    parser.add_argument("--seq", type=int, default=None, help="most tokens of a prompt + completion (default 512, "
                                                              "quick 128)")
    parser.add_argument("--data", default=None,
                        help="a prompt/chosen/rejected JSONL file of string rows; default: a generated set of "
                             "varied lengths from the built-in corpus")
    parser.add_argument("--providers", default=None, help=f"comma-separated subset of: {', '.join(PROVIDERS)}")


# ------------------------------------------------------------------------------ data

def _make_data(root: Path, tokenizer: Any, seq: int, count: int) -> Path:
    """``count`` prompt/chosen/rejected rows: a passage's continuation is chosen, the next row's
    continuation (another passage) rejected."""
    rows = continuation_rows(tokenizer, seq, count + 1)
    prefs = [{"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]}
             for a, b in itertools.pairwise(rows) if a["completion"] != b["completion"]]
    path = root / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prefs))
    return path


def _load_pairs(model_dir: str, data: str, seq: int) -> list[Any]:
    """The rows of ``data`` as ``parallax.align.PreferencePair`` (chosen, rejected examples with
    completion-only targets) of at most ``seq`` tokens, so that no tool truncates anything."""
    from parallax.align import load_preference_pairs
    from parallax.data import load_tokenizer

    return load_preference_pairs(data, load_tokenizer(model_dir), max_length=seq - 1)


def _prompt_length(example: Any) -> int:
    """Tokens before the completion (the first trained token)."""
    return example.trained.index(True)


def _steps_of(pairs: Sequence[Any], per_step: int) -> list[list[Any]]:
    return [list(pairs[i:i + per_step]) for i in range(0, len(pairs), per_step)]


# ------------------------------------------------------------------------------ providers

@dataclass(frozen=True)
class Spec:
    """What a provider's process needs (picklable)."""

    provider: str
    model_dir: str
    adapter_dir: str
    data: str
    seq: int
    pairs: int
    warmup: int
    steps: int
    device: str


@dataclass
class StepLog:
    """Per-step figures of one provider's run (means over the step's pairs), and the first
    step's sequences as (tokens, prompt length): chosen rows, then rejected rows."""

    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    chosen_logps: list[float] = field(default_factory=list)
    rejected_logps: list[float] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    first_batch: list[tuple[list[int], int]] = field(default_factory=list)
    peak_bytes: int = 0  # over the start of training
    weight_bytes: int = 0
    trainable: int = 0


def _weight_bytes(*models: torch.nn.Module) -> int:
    """Bytes of the distinct parameters of the models."""
    tensors = {p.data_ptr(): p for model in models for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in tensors.values())


def _sequences(step: Sequence[Any]) -> list[tuple[list[int], int]]:
    return [(list(e.tokens), _prompt_length(e)) for e in [p.chosen for p in step] + [p.rejected for p in step]]


def _parallax_run(spec: Spec) -> StepLog:
    """parallax: the imported model with the shared LoRA adapter, ``PreferenceObjective`` (the
    reference with the adapters disabled) on ``collate_pairs`` batches, px.optim.AdamW."""
    import parallax as px
    from parallax.align import PreferenceObjective, collate_pairs
    from parallax.models import from_hf

    device = torch.device(spec.device)
    steps = _steps_of(_load_pairs(spec.model_dir, spec.data, spec.seq), spec.pairs)
    pad_id = px.data.load_tokenizer(spec.model_dir).eos_token_id
    model = from_hf(spec.model_dir).to(device).train()
    px.peft.load_adapter(model, spec.adapter_dir, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    log = StepLog(first_batch=_sequences(steps[0]), weight_bytes=_weight_bytes(model),
                  trainable=sum(p.numel() for p in params))
    optimizer = px.optim.AdamW(params, lr=LR, weight_decay=0.0)
    objective = PreferenceObjective("dpo", beta=BETA)
    packing = spec.provider == "parallax packed"
    memory = PeakMemory(device)
    memory.start()
    clock = StepClock(device)
    for step in range(spec.warmup + spec.steps):
        group = steps[step % len(steps)]
        batch = collate_pairs(group, pad_id, packing=packing, block_size=spec.seq, device=device)
        loss, stats = objective(model, batch)
        clipped_step(loss, params, optimizer)
        log.losses.append(loss.item())
        log.seconds.append(clock.lap())
        log.tokens.append(sum(len(p.chosen.tokens) + len(p.rejected.tokens) for p in group))
        # the objective's statistics are sums over the pairs, TRL's means
        log.chosen_logps.append(stats["logps/chosen"].item() / len(group))
        log.rejected_logps.append(stats["logps/rejected"].item() / len(group))
        log.margins.append(stats["rewards/margins"].item() / len(group))
    log.peak_bytes = memory.stop()
    return log


def _trl_run(spec: Spec) -> StepLog:
    """TRL's DPOTrainer on the transformers model with the shared PEFT adapter (trainable), the
    reference by the disabled adapter or a separate model copy."""
    import datasets
    import peft
    import transformers
    import trl

    quiet_hugging_face()
    device = torch.device(spec.device)
    pairs = _load_pairs(spec.model_dir, spec.data, spec.seq)
    dataset = datasets.Dataset.from_dict({
        "prompt_ids": [list(p.chosen.tokens[:_prompt_length(p.chosen)]) for p in pairs],
        "chosen_ids": [list(p.chosen.tokens[_prompt_length(p.chosen):]) for p in pairs],
        "rejected_ids": [list(p.rejected.tokens[_prompt_length(p.rejected):]) for p in pairs]})
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(spec.model_dir, attn_implementation="sdpa")
    model = peft.PeftModel.from_pretrained(hf, spec.adapter_dir, is_trainable=True)
    explicit = spec.provider == "TRL explicit ref"
    reference = (transformers.AutoModelForCausalLM.from_pretrained(spec.model_dir, attn_implementation="sdpa")
                 if explicit else None)
    log = StepLog(weight_bytes=_weight_bytes(model, *([reference] if explicit else [])),
                  trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    with tempfile.TemporaryDirectory() as out:
        config = trl.DPOConfig(
            output_dir=out, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False, max_length=None,
            per_device_train_batch_size=spec.pairs, max_steps=spec.warmup + spec.steps,
            train_sampling_strategy="sequential", gradient_checkpointing=False, **trainer_arguments(device))
        trainer = _recording_trainer(log)(
            model=model, ref_model=reference, args=config, train_dataset=dataset, processing_class=tokenizer,
            callbacks=[timing_callback(log, device)])
        if "ref" in trainer.model.peft_config:
            trainer.model.delete_adapter("ref")  # the base model is the reference: adapters disabled
        train_quietly(trainer)
    return log


def _recording_trainer(log: StepLog) -> type:
    """DPOTrainer taking already tokenized pairs and recording each step's loss, tokens and
    metrics (TRL's ``logps/*`` and ``rewards/margins``), and its first batch."""
    import trl

    class RecordingDPOTrainer(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # prompt_ids / chosen_ids / rejected_ids rendered by parallax, EOS included

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            metrics = self._metrics["train"]
            log.losses.append(loss.item())
            log.tokens.append(int(inputs["attention_mask"].sum()))
            log.chosen_logps.append(metrics["logps/chosen"][-1])
            log.rejected_logps.append(metrics["logps/rejected"][-1])
            log.margins.append(metrics["rewards/margins"][-1])
            if not log.first_batch:
                log.first_batch = [(ids[:n], completion.index(1)) for ids, completion, n in zip(
                    inputs["input_ids"].tolist(), inputs["completion_mask"].tolist(),
                    inputs["attention_mask"].sum(1).tolist(), strict=True)]
            return loss

    return RecordingDPOTrainer


def _run_provider(spec: Spec) -> StepLog:
    return _parallax_run(spec) if spec.provider.startswith("parallax") else _trl_run(spec)


# ------------------------------------------------------------------------------ reporting

def _base_logps(hf: Any, sequences: Sequence[tuple[list[int], int]]) -> tuple[float, float]:
    """The base model's mean summed completion log-probability of the chosen (first half) and
    rejected (second half) sequences, each computed alone."""
    logps = []
    with torch.no_grad():
        for tokens, prompt in sequences:
            ids = torch.tensor([tokens])
            logp = torch.log_softmax(hf(input_ids=ids).logits[0, :-1].float(), dim=-1)
            per_token = logp.gather(1, ids[0, 1:, None])[:, 0]
            logps.append(per_token[prompt - 1:].sum().item())
    half = len(logps) // 2
    return sum(logps[:half]) / half, sum(logps[half:]) / half


def _row(provider: str, spec: Spec, log: dict[str, Any], base: tuple[float, float]) -> dict[str, Any]:
    timed = slice(spec.warmup, None)
    seconds = log["seconds"][timed]
    logps0 = (log["chosen_logps"][0], log["rejected_logps"][0])
    return {
        "provider": provider, "pairs": spec.pairs, "seq": spec.seq, "steps": len(seconds),
        "median_ms": 1e3 * quantile(seconds, 0.5),
        "tokens_per_s": quantile([n / t for n, t in zip(log["tokens"][timed], seconds, strict=True)], 0.5),
        "weights_mb": log["weight_bytes"] / 2**20, "peak_mb": (log["weight_bytes"] + log["peak_bytes"]) / 2**20,
        "trainable": log["trainable"], "loss0": log["losses"][0], "logps0_chosen": logps0[0],
        "logps0_rejected": logps0[1],
        "logps0_err": max(abs(ours - theirs) for ours, theirs in zip(logps0, base, strict=True)),
        "margin1": log["margins"][1] if len(log["margins"]) > 1 else None, "final_loss": log["losses"][-1],
    }


def run(ctx) -> Iterator[dict]:
    import transformers

    from parallax.data import load_tokenizer

    transformers.logging.disable_progress_bar()
    case = QUICK if ctx.quick else FULL
    seq = ctx.args.seq or case.seq
    steps = ctx.args.steps or case.steps
    per_step = ctx.args.pairs or PAIRS_PER_STEP["quick" if ctx.quick else "full"]
    names = check_providers(ctx.args.providers, PROVIDERS, "align")
    add_versions(ctx)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model_dir = make_model_dir(root, dataclasses.replace(case, seq=seq))
        adapter_dir = make_adapter_dir(root, model_dir)
        data = Path(ctx.args.data) if ctx.args.data else _make_data(root, load_tokenizer(model_dir), seq,
                                                                    case.examples)
        pairs = _load_pairs(str(model_dir), str(data), seq)
        lengths = [len(e.tokens) for pair in pairs for e in (pair.chosen, pair.rejected)]
        ctx.note("data", f"{len(pairs)} pairs, sequences of {min(lengths)}-{max(lengths)} tokens "
                         f"(mean {sum(lengths) / len(lengths):.0f}), {per_step} pairs per step in file order")
        threads = torch.get_num_threads()
        logs = {}
        for name in names:
            spec = Spec(name, str(model_dir), str(adapter_dir), str(data), seq, per_step, case.warmup, steps,
                        ctx.device.type)
            ctx.log(f"{name}: {case.warmup} warm-up + {steps} timed steps")
            logs[name] = (spec, in_fresh_process(_run_provider, spec, threads))
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        rows = [_row(name, spec, log, _base_logps(hf, log["first_batch"])) for name, (spec, log) in logs.items()]
    by_name = {r["provider"]: r for r in rows}
    for row in rows:
        speed, memory = by_name.get(SPEED_BASELINE), by_name.get(MEMORY_BASELINE)
        row["vs_trl"] = row["tokens_per_s"] / speed["tokens_per_s"] if speed else None
        row["memory_vs_explicit"] = row["peak_mb"] / memory["peak_mb"] if memory else None
    _notes(ctx, by_name, case, seq)
    yield from rows


def _notes(ctx, by_name: dict[str, dict], case: Case, seq: int) -> None:
    memory = "peak CUDA memory allocated" if ctx.device.type == "cuda" else "peak RSS (psutil, 5 ms samples)"
    ctx.note("method", f"Llama {case.layers}x{case.width} (GQA {case.heads}/{case.kv_heads}, vocab {case.vocab}), "
                       f"seq <= {seq}; LoRA r={LORA_R} alpha={LORA_ALPHA} all-linear, same initial adapter; AdamW "
                       f"lr {LR}, constant, clip 1.0; sigmoid DPO beta {BETA}, reference log-probabilities every "
                       f"step; each provider in a fresh process; tokens/s: the median per-step rate over the timed "
                       f"steps after {case.warmup} warm-up (prompt + chosen and prompt + rejected tokens, no "
                       f"padding); peak mem = weights held + {memory} over the start of training; loss0 should be "
                       f"log 2 = {math.log(2):.4f}")
    goals = {}
    for name in ("parallax", "parallax packed"):
        ours = by_name.get(name)
        if ours and ours["vs_trl"] is not None:
            goals[f"{name} tokens/s >= {GOAL_SPEEDUP:g}x {SPEED_BASELINE}"] = (
                f"{ours['vs_trl']:.2f}x, {'met' if ours['vs_trl'] >= GOAL_SPEEDUP else 'not met'}")
        if ours and ours["memory_vs_explicit"] is not None:
            ratio = ours["memory_vs_explicit"]
            goals[f"{name} peak memory <= {GOAL_MEMORY:g}x {MEMORY_BASELINE}"] = (
                f"{ratio:.2f}x, {'met' if ratio <= GOAL_MEMORY else 'not met'}")
    ctx.note("goals", goals)
