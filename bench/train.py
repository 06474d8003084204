"""Training step throughput: the ``parallax train`` loop against a plain PyTorch loop.

Both train the same model from the same initial weights on the same batches with the same
schedule. The parallax side is the real loop of ``parallax train`` (``parallax.train.train``:
its batch sampler, per-step seeding, lr schedule, fused AdamW, logging cadence; progress bar
off). The plain side is what a user writes by hand: ``loss = F.cross_entropy(model(x), y);
loss.backward(); clip; torch.optim.AdamW(fused=True).step(); zero_grad()`` with the same
logging cadence. ``--family gpt2`` (the default) measures the runtime's overhead on the same
``GPT`` module; ``--family llama`` trains a Llama-family preset in parallax (fused RMSNorm,
rotary, SwiGLU and linear + cross-entropy kernels on CUDA) against ``transformers``'
``LlamaForCausalLM`` (its default SDPA attention) with the same weights.

The two are interleaved step by step in one process: ``train``'s per-step callback runs one
plain step and timestamps around it, so each parallax step is the time from the end of one
callback to the start of the next. Evaluation and checkpoints are scheduled after the timed
steps. ``loss diff`` is the largest difference of the logged losses, a check that both loops
really did the same training.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator

import torch

from .table import Column
from .timing import quantile

COLUMNS = [
    Column("model", "model"),
    Column("params", "params [M]", ".2f", scale=1e-6),
    Column("batch", "batch x seq"),
    Column("provider", "provider"),
    Column("steps", "steps", "d"),
    Column("median_ms", "median [ms/step]", ".1f"),
    Column("p20_ms", "p20 [ms]", ".1f"),
    Column("p80_ms", "p80 [ms]", ".1f"),
    Column("tokens_per_s", "tokens/s", ",.0f"),
    Column("vs_plain", "vs plain [x]", ".3f"),
    Column("loss_diff", "loss diff", ".1e"),
]

# family -> case name -> (preset, model overrides, block size, batch size, steps, quick steps)
CASES = {
    "gpt2": {
        "tiny": ("tiny", {}, 128, 16, 300, 30),
        "small": ("tiny", {"n_layer": 6, "n_head": 6, "n_embd": 384}, 256, 8, 60, 6),
    },
    "llama": {
        "llama-tiny": ("llama-tiny", {}, 128, 16, 300, 30),
        "llama-small": ("llama-tiny", {"n_layer": 6, "n_head": 6, "n_kv_head": 2, "n_embd": 384,
                                       "intermediate_size": 1024}, 256, 8, 60, 6),
    },
}
LOG_INTERVAL = 10


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--family", default="gpt2", choices=sorted(CASES),
                        help="gpt2: parallax train vs a plain loop over the same GPT; llama: parallax train on a "
                             "Llama-family preset vs a plain loop over transformers' LlamaForCausalLM")
    parser.add_argument("--cases", default=None,
                        help="comma-separated subset of the family's cases (" +
                             "; ".join(f"{f}: {','.join(c)}" for f, c in CASES.items()) + ")")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default: per case)")


def _plain_model(cfg, family: str, vocab_size: int) -> torch.nn.Module:
    """The plain side's model, with the initial weights ``parallax train`` starts from: the same
    GPT module, or transformers' LlamaForCausalLM holding the Llama's weights (same names)."""
    from parallax.models import build_model, to_hf

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model_config(vocab_size))
    if family == "gpt2":
        return model
    import transformers

    with tempfile.TemporaryDirectory() as d:  # to_hf writes the config transformers reads
        to_hf(model, d)
        return transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa")


def _plain_loop(cfg, family: str, ds, block_size: int, device: torch.device):
    """One step of the hand-written loop per call; the same model init, batches and schedule."""
    from parallax.train.loop import lr_at, param_groups

    model = _plain_model(cfg, family, ds.tokenizer.vocab_size).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    losses: dict[int, float] = {}
    state = {"step": 0}

    def step() -> None:
        s = state["step"]
        x, y = ds.get_batch("train", cfg.batch_size, block_size, step=s, seed=cfg.seed, device=device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(s, cfg)
        logits = model(x) if family == "gpt2" else model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (s + 1) % LOG_INTERVAL == 0:
            losses[s + 1] = loss.item()
        state["step"] = s + 1

    return step, losses


def _run_case(ctx, family: str, name: str, steps: int) -> Iterator[dict]:
    from parallax.data import load_dataset
    from parallax.models import build_model
    from parallax.train import TrainConfig, train
    from parallax.train.metrics import read_metrics

    preset, overrides, block_size, batch, _, _ = CASES[family][name]
    with tempfile.TemporaryDirectory() as out:
        # Eval and checkpoint only after the timed steps (one extra step carries them).
        cfg = TrainConfig(preset=preset, model=overrides, block_size=block_size, batch_size=batch, steps=steps + 1,
                          log_interval=LOG_INTERVAL, eval_interval=steps + 1, checkpoint_interval=steps + 1,
                          eval_batches=1, sample_tokens=0, out=out, device=str(ctx.device.type))
        ds = load_dataset(cfg.data)
        plain_step, plain_losses = _plain_loop(cfg, family, ds, block_size, ctx.device)
        sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
        plain = "plain PyTorch" if family == "gpt2" else "plain HF Llama"
        times: dict[str, list[float]] = {"parallax train": [], plain: []}
        mark = {"t": None}

        def on_step(step: int, record: dict) -> None:
            sync()  # a CUDA step is timed when its kernels are done, not when they are queued
            now = time.perf_counter()
            if mark["t"] is not None and step <= steps:
                times["parallax train"].append(now - mark["t"])
            if step <= steps:
                t0 = time.perf_counter()
                plain_step()
                sync()
                times[plain].append(time.perf_counter() - t0)
            mark["t"] = time.perf_counter()

        train(cfg, progress=False, on_step=on_step)
        ours = {r["step"]: r["loss"] for r in read_metrics(f"{out}/metrics.jsonl") if "loss" in r}
    with torch.device("meta"):
        num_params = sum(p.numel() for p in build_model(cfg.model_config(ds.tokenizer.vocab_size)).parameters())

    common = [s for s in plain_losses if s in ours]
    loss_diff = max((abs(ours[s] - plain_losses[s]) for s in common), default=float("nan"))
    # The first steps warm up allocators and caches for both loops.
    warm = max(1, len(times[plain]) // 10)
    medians = {k: quantile(v[warm:], 0.5) for k, v in times.items()}
    tokens = batch * block_size
    for provider, values in times.items():
        values = values[warm:]
        yield {
            "model": name, "params": num_params, "batch": f"{batch}x{block_size}", "provider": provider,
            "steps": len(values), "median_ms": 1e3 * medians[provider], "p20_ms": 1e3 * quantile(values, 0.2),
            "p80_ms": 1e3 * quantile(values, 0.8), "tokens_per_s": tokens / medians[provider],
            "vs_plain": medians[plain] / medians[provider], "loss_diff": loss_diff,
        }


def run(ctx) -> Iterator[dict]:
    family = ctx.args.family
    cases = CASES[family]
    names = [n.strip() for n in (ctx.args.cases or ",".join(cases)).split(",") if n.strip()]
    unknown = sorted(set(names) - set(cases))
    if unknown:
        raise ValueError(f"--cases: unknown case(s) {', '.join(unknown)} for --family {family}; "
                         f"known: {', '.join(cases)}")
    ctx.note("method", "steps interleaved one by one in one process; vs plain = plain median / parallax median")
    if family == "llama":
        ctx.note("baseline", "transformers LlamaForCausalLM (SDPA attention) with the same initial weights, "
                             "torch.optim.AdamW(fused=True)")
    rows = []
    for name in names:
        default_steps, quick_steps = cases[name][4], cases[name][5]
        steps = ctx.args.steps or (quick_steps if ctx.quick else default_steps)
        for row in _run_case(ctx, family, name, steps):
            rows.append(row)
            yield row
    if family == "llama" and not ctx.quick:
        # issue 10's goal: >= 1.0x transformers on CPU, >= 1.3x on GPU with the fused kernels (not asserted)
        target = 1.3 if ctx.device.type == "cuda" else 1.0
        ctx.note("goals", {f"{r['model']}: parallax train >= {target}x plain HF Llama tokens/s":
                           f"{r['vs_plain']:.2f}x, {'met' if r['vs_plain'] >= target else 'not met'}"
                           for r in rows if r["provider"] == "parallax train"})
