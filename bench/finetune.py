"""LoRA supervised fine-tuning throughput: parallax SFT against TRL's ``SFTTrainer`` with PEFT.

Every provider trains the same random-initialised ``transformers`` Llama (saved to a temporary
directory with a BPE tokenizer trained on the built-in corpus; parallax imports it with
``parallax.models.from_hf``) with the same LoRA adapter (r=16, alpha=32, no dropout, all linear
projections; one PEFT adapter directory initialises every provider, so the A matrices are the
same), the same AdamW (lr, betas, no weight decay, constant lr, gradient clipping at 1.0), the
same completion-only loss and the same examples: prompt/completion rows of varied lengths
rendered once by ``parallax.finetune.load_sft_examples`` and handed to TRL as a tokenized
``datasets.Dataset`` (``input_ids`` + ``completion_mask``), so both train on identical tokens.

Providers:

- ``parallax packed``: best-fit-decreasing bins of ``seq`` positions (``pack_examples``), one
  padding-free bin per step (``collate_packed``; each example attends only within itself);
- ``parallax padded``: ``batch`` examples per step in file order, right-padded (``collate_padded``);
- ``TRL packed``: ``packing=True`` (TRL's BFD packing, padding-free), one bin of ``seq`` tokens
  per step;
- ``TRL padding-free``: ``padding_free=True`` without packing, ``batch`` examples per step;
- ``TRL padded``: ``batch`` examples per step, padded by TRL's collator.

The padded/padding-free rows see the same batches in the same order (TRL's sequential sampler);
the packed rows each use their own tool's bins, in a seeded random order (best-fit-decreasing
makes the first bins hold the longest examples, so the first steps would not be a fair sample).
Each provider runs in a fresh process, one after the other, so its peak memory is its own: the
peak resident set size sampled every 5 ms during training minus the size when training starts
(CUDA: ``torch.cuda.max_memory_allocated`` over the allocation at the start). Steps are timed
from the end of one to the end of the next (data collation included) after the warm-up steps;
tokens/s are totals over the timed steps divided by their time. ``loss0 err`` is the first step's
loss minus the base model's loss over the same batch's trained targets, computed example by
example without padding by ``transformers``: with B zero-initialised every provider starts at
the base model's loss, so this checks each provider's loss, packing included (no attention across
examples). The padded rows' equal ``loss0``, ``in loss`` share and final loss show that parallax
and TRL train on the same tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
    Column("batch", "batch"),
    Column("steps", "steps", "d"),
    Column("median_ms", "median [ms/step]", ".0f"),
    Column("trained_tokens_per_s", "trained tok/s", ",.0f"),
    Column("tokens_per_s", "tokens/s", ",.0f"),
    Column("vs_trl", "vs best TRL [x]", ".2f"),
    Column("padding_share", "padding [%]", ".1f", scale=100.0),
    Column("trained_share", "in loss [%]", ".1f", scale=100.0),
    Column("peak_mb", "peak mem [MB]", ",.0f"),
    Column("trainable", "trainable [M]", ".3f", scale=1e-6),
    Column("loss0", "loss0", ".4f"),
    Column("loss0_err", "loss0 err", ".1e"),
    Column("final_loss", "final loss", ".4f"),
]

PROVIDERS = ("parallax packed", "TRL packed", "parallax padded", "TRL padded", "TRL padding-free")
GOAL_SPEEDUP, GOAL_PADDING = 1.5, 0.02


FULL = Case(width=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=4096, seq=512, examples=640,
            warmup=3, steps=24)
QUICK = Case(width=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2048, seq=256, examples=96,
             warmup=1, steps=3)


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--steps", type=int, default=None, help="timed steps per provider (default 24, quick 3)")
    parser.add_argument("--seq", type=int, default=None, help="max positions per example and per packed bin "
                                                              "(default 512, quick 256)")
    parser.add_argument("--data", default=None,
                        help="a prompt/completion JSONL file (e.g. parallax/finetune/demo/train.jsonl); default: a "
                             "generated set of varied lengths from the built-in corpus")
    parser.add_argument("--providers", default=None, help=f"comma-separated subset of: {', '.join(PROVIDERS)}")


def _make_data(root: Path, tokenizer: Any, seq: int, count: int) -> Path:
    """``count`` prompt/completion rows of varied lengths (``continuation_rows``) as a JSONL file."""
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in continuation_rows(tokenizer, seq, count)))
    return path


@dataclass(frozen=True)
class Spec:
    """What a provider's process needs (picklable)."""

    provider: str
    model_dir: str
    adapter_dir: str
    data: str
    seq: int
    batch: int
    warmup: int
    steps: int
    device: str
    threads: int


def _load_examples(model_dir: str, data: str, seq: int) -> list:
    """The rendered examples (``SFTExample``), at most ``seq`` tokens each (``seq`` - 1 positions),
    so that no tool truncates anything and both pack the same token counts."""
    from parallax.data import load_tokenizer
    from parallax.finetune import load_sft_examples

    return load_sft_examples(data, load_tokenizer(model_dir), max_length=seq - 1, loss="completion")


# ------------------------------------------------------------------------------ measurement

@dataclass
class StepLog:
    """Per-step figures of one provider's run, and the first batch as (inputs, targets) pairs."""

    seconds: list[float]
    losses: list[float]
    trained: list[int]  # targets in the loss
    tokens: list[int]  # real (non-pad) positions processed
    positions: list[int]  # positions processed, padding included
    first_batch: list[tuple[list[int], list[int]]]
    peak_bytes: int
    trainable: int


def _parallax_run(spec: Spec) -> StepLog:
    """parallax: the imported model with the shared LoRA adapter, packed or padded batches, px.optim.AdamW."""
    import parallax as px
    from parallax.finetune import collate_packed, collate_padded, pack_examples
    from parallax.models import from_hf

    device = torch.device(spec.device)
    model = from_hf(spec.model_dir).to(device).train()
    px.peft.load_adapter(model, spec.adapter_dir, is_trainable=True)
    examples = _load_examples(spec.model_dir, spec.data, spec.seq)
    packed = spec.provider == "parallax packed"
    if packed:
        groups = pack_examples(examples, spec.seq)
        # BFD emits the bins longest examples first: a seeded shuffle makes the timed bins a fair sample
        # (TRL's packed rows use its random sampler for the same reason).
        random.Random(0).shuffle(groups)
    else:
        groups = [examples[i:i + spec.batch] for i in range(0, len(examples), spec.batch)]
    pad_id = px.data.load_tokenizer(spec.model_dir).eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = px.optim.AdamW(params, lr=LR, weight_decay=0.0)
    log = StepLog([], [], [], [], [], [], 0, sum(p.numel() for p in params))
    log.first_batch = [tuple(t.tolist() for t in e.inputs_and_targets()) for e in groups[0]]
    memory = PeakMemory(device)
    memory.start()
    clock = StepClock(device)
    for step in range(spec.warmup + spec.steps):
        group = groups[step % len(groups)]
        if packed:
            batch = collate_packed(group).to(device)
            loss = model(batch.input_ids, batch.targets, positions=batch.positions)
            padding = 0
        else:
            batch = collate_padded(group, pad_id)
            loss = model(batch.input_ids.to(device), batch.targets.to(device))
            padding = batch.num_padding
        clipped_step(loss, params, optimizer)
        log.losses.append(loss.item())
        log.seconds.append(clock.lap())
        log.positions.append(batch.input_ids.numel())
        log.tokens.append(batch.input_ids.numel() - padding)
        log.trained.append(int((batch.targets != -100).sum()))
    log.peak_bytes = memory.stop()
    return log


def _trl_run(spec: Spec) -> StepLog:
    """TRL's SFTTrainer on the transformers model with the shared PEFT adapter (trainable)."""
    import datasets
    import peft
    import transformers
    import trl

    quiet_hugging_face()
    device = torch.device(spec.device)
    examples = _load_examples(spec.model_dir, spec.data, spec.seq)
    dataset = datasets.Dataset.from_dict({"input_ids": [list(e.tokens) for e in examples],
                                          "completion_mask": [[int(t) for t in e.trained] for e in examples]})
    hf = transformers.AutoModelForCausalLM.from_pretrained(spec.model_dir, attn_implementation="sdpa")
    model = peft.PeftModel.from_pretrained(hf, spec.adapter_dir, is_trainable=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.model_dir)
    packing = spec.provider == "TRL packed"
    padding_free = spec.provider == "TRL padding-free"
    log = StepLog([], [], [], [], [], [], 0, sum(p.numel() for p in model.parameters() if p.requires_grad))
    with tempfile.TemporaryDirectory() as out:
        config = trl.SFTConfig(
            output_dir=out, max_length=None if padding_free else spec.seq, packing=packing,
            padding_free=padding_free, completion_only_loss=True,
            per_device_train_batch_size=1 if packing else spec.batch, max_steps=spec.warmup + spec.steps,
            train_sampling_strategy="random" if packing else "sequential", **trainer_arguments(device))
        trainer = _recording_trainer(trl.SFTTrainer, log)(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
            callbacks=[timing_callback(log, device)])
        train_quietly(trainer)
    return log


def _recording_trainer(base: type, log: StepLog) -> type:
    """``base`` (SFTTrainer) recording each step's loss, token counts and its first batch."""

    class RecordingTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = result[0] if return_outputs else result
            log.losses.append(loss.item())
            input_ids, labels = inputs["input_ids"], inputs["labels"]
            log.positions.append(input_ids.numel())
            mask = inputs.get("attention_mask")
            log.tokens.append(input_ids.numel() if mask is None else int(mask.sum()))
            log.trained.append(int((labels[:, 1:] != -100).sum()))  # the model shifts labels left by one
            if not log.first_batch:
                log.first_batch = _trl_pairs(inputs)
            return result

    return RecordingTrainer


def _trl_pairs(inputs: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """A TRL batch as per-example (inputs, shifted targets): rows without their padding, or the
    segments of a padding-free row (positions restart at 0)."""
    pairs = []
    if "position_ids" in inputs:
        ids, labels, pos = (inputs[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        rows = [(ids[a:b], labels[a:b]) for a, b in itertools.pairwise(starts)]
    else:
        rows = [(ids[:n], labels[:n]) for ids, labels, n in
                zip(inputs["input_ids"].tolist(), inputs["labels"].tolist(), inputs["attention_mask"].sum(1).tolist())]
    for ids, labels in rows:
        pairs.append((ids[:-1], labels[1:]))
    return pairs


def _run_provider(spec: Spec) -> StepLog:
    return _parallax_run(spec) if spec.provider.startswith("parallax") else _trl_run(spec)


# ------------------------------------------------------------------------------ reporting

def _reference_loss(hf: Any, pairs: Sequence[tuple[list[int], list[int]]]) -> float:
    """The base model's mean cross-entropy over the trained targets of the examples, each alone."""
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in pairs:
            logits = hf(input_ids=torch.tensor([inputs])).logits[0].float()
            target = torch.tensor(targets)
            total += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / count


def _row(provider: str, spec: Spec, log: dict[str, Any], reference: float) -> dict[str, Any]:
    timed = slice(spec.warmup, None)
    seconds = sum(log["seconds"][timed])
    positions = sum(log["positions"][timed])
    return {
        "provider": provider, "batch": "1 bin" if "packed" in provider else f"{spec.batch} ex",
        "seq": spec.seq, "steps": len(log["seconds"][timed]), "median_ms": 1e3 * quantile(log["seconds"][timed], 0.5),
        "trained_tokens_per_s": sum(log["trained"][timed]) / seconds,
        "tokens_per_s": sum(log["tokens"][timed]) / seconds,
        "padding_share": 1.0 - sum(log["tokens"][timed]) / positions,
        "trained_share": sum(log["trained"][timed]) / sum(log["tokens"][timed]),
        "peak_mb": log["peak_bytes"] / 2**20, "trainable": log["trainable"],
        "loss0": log["losses"][0], "loss0_err": log["losses"][0] - reference, "final_loss": log["losses"][-1],
    }


def run(ctx) -> Iterator[dict]:
    import transformers
    from parallax.data import load_tokenizer
    from parallax.finetune import pack_examples, packing_padding_share

    transformers.logging.disable_progress_bar()
    case = QUICK if ctx.quick else FULL
    seq = ctx.args.seq or case.seq
    steps = ctx.args.steps or case.steps
    names = check_providers(ctx.args.providers, PROVIDERS, "finetune")
    add_versions(ctx)
    ctx.skip("Unsloth", "unsloth is not installed" if importlib.util.find_spec("unsloth") is None
             else "Unsloth needs a CUDA GPU; this benchmark runs every provider on CPU")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model_dir = make_model_dir(root, dataclasses.replace(case, seq=seq))
        adapter_dir = make_adapter_dir(root, model_dir)
        tokenizer = load_tokenizer(model_dir)
        data = Path(ctx.args.data) if ctx.args.data else _make_data(root, tokenizer, seq, case.examples)
        examples = _load_examples(str(model_dir), str(data), seq)
        bins = pack_examples(examples, seq)
        batch = max(2, round(len(examples) / len(bins)))  # examples per padded step ~ per packed bin
        ctx.note("data", f"{len(examples)} examples of {min(map(len, examples)) + 1}-{max(map(len, examples)) + 1} "
                         f"tokens ({sum(e.num_trained for e in examples)} trained), {len(bins)} parallax bins of "
                         f"{seq} positions ({100 * packing_padding_share(bins, seq):.1f}% of their capacity empty)")
        threads = torch.get_num_threads()
        logs = {}
        for name in names:
            spec = Spec(name, str(model_dir), str(adapter_dir), str(data), seq, batch, case.warmup, steps,
                        ctx.device.type, threads)
            ctx.log(f"{name}: {case.warmup} warm-up + {steps} timed steps")
            logs[name] = (spec, in_fresh_process(_run_provider, spec, threads))
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        rows = [_row(name, spec, log, _reference_loss(hf, log["first_batch"])) for name, (spec, log) in logs.items()]
    best_trl = max((r["trained_tokens_per_s"] for r in rows if r["provider"].startswith("TRL")), default=None)
    for row in rows:
        row["vs_trl"] = row["trained_tokens_per_s"] / best_trl if best_trl else None
    _notes(ctx, rows, case, seq)
    yield from rows


def _notes(ctx, rows: list[dict], case: Case, seq: int) -> None:
    memory = "peak CUDA memory allocated" if ctx.device.type == "cuda" else "peak RSS (psutil, 5 ms samples)"
    ctx.note("method", f"Llama {case.layers}x{case.width} (GQA {case.heads}/{case.kv_heads}), seq {seq}; LoRA r="
                       f"{LORA_R} alpha={LORA_ALPHA} all-linear, same initial adapter; AdamW lr {LR}, constant, clip "
                       f"1.0; each provider in a fresh process; tok/s over the timed steps after {case.warmup} "
                       f"warm-up; peak mem = {memory} over the start of training; trained tok/s counts targets in "
                       "the loss, tokens/s the real tokens processed")
    by_name = {r["provider"]: r for r in rows}
    goals = {}
    ours, theirs = by_name.get("parallax packed"), by_name.get("TRL packed")
    if ours and ours["vs_trl"] is not None:
        goals[f"parallax packed >= {GOAL_SPEEDUP:g}x the best TRL trained tokens/s"] = (
            f"{ours['vs_trl']:.2f}x, {'met' if ours['vs_trl'] >= GOAL_SPEEDUP else 'not met'}")
    if ours:
        goals[f"parallax packed padding share < {100 * GOAL_PADDING:g}%"] = (
            f"{100 * ours['padding_share']:.1f}%, {'met' if ours['padding_share'] < GOAL_PADDING else 'not met'}")
    if ours and theirs:
        goals["parallax packed peak memory <= TRL packed"] = (
            f"{ours['peak_mb']:.0f} vs {theirs['peak_mb']:.0f} MB, "
            f"{'met' if ours['peak_mb'] <= theirs['peak_mb'] else 'not met'}")
    ctx.note("goals", goals)
