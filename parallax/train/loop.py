"""The ``parallax train`` loop: any model family on a token dataset with parallax's fused AdamW.

Every source of randomness is a pure function of (seed, step, rank): the batch sampler and
the dropout seed, re-set each step. So a run resumed from a checkpoint reproduces the losses
of an uninterrupted run bit for bit, with no sampler or RNG state to save.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallax import checkpoint
from parallax.data import TokenDataset
from parallax.data.tokenizer import tokenizer_reference
from parallax.distributed import DistInfo, init_from_env, shutdown
from parallax.models import ModelConfig
from parallax.optim import AdamW
from parallax.progress import progress_bar
from parallax.runtime import initialize
from parallax.train.checkpoints import (
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
    saved_model_config,
    saved_tokenizer_reference,
)
from parallax.train.config import ConfigError, TrainConfig
from parallax.train.metrics import MetricsLog, plot_losses
from parallax.train.parallelism import DataShard, check_model_parallel, parallelize_for_training, \
    pipeline_for_training, setup_mesh
from parallax.train.planning import resolve_plan
from parallax.zero import memory_report
from parallax.zero.module import zero_state

__all__ = ["TrainResult", "train", "lr_at", "param_groups", "validate_before_launch"]

log = logging.getLogger(__name__)
memory_log = logging.getLogger("parallax.train.memory")  # shown on every rank (the CLI sets it to INFO)
SAMPLE_PROMPT = "The "


@dataclass
class TrainResult:
    out: Path
    steps: int
    loss: float | None
    val_loss: float | None
    initial_val_loss: float | None
    tokens_per_s: float | None
    sample: str | None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights), none on biases and LayerNorm."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (2**63)


@torch.no_grad()
def _evaluate(model: nn.Module, ds: TokenDataset, cfg: TrainConfig, block_size: int,
              device: torch.device, par: _Parallel) -> dict[str, float]:
    """{"val_loss": the mean of the batches' losses, "val_" + statistic: its mean over loss units}."""
    model.eval()
    losses, units, sums = [], 0, {}
    for batch in ds.iter_eval_batches("val", cfg.batch_size, block_size, max_batches=cfg.eval_batches,
                                      device=device):
        if par.pipeline is not None:
            loss, n, stats = par.pipeline.eval_step(batch[0], batch[1]), 1, {}
        else:
            loss, n, stats = cfg.batch_loss(model, batch)
        losses.append(loss.item())
        units += n
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + float(value)
    model.train()
    return {"val_loss": sum(losses) / len(losses)} | {f"val_{name}": value / units for name, value in sums.items()}


def _prepare_out(cfg: TrainConfig) -> Path | None:
    """Validate the output directory against resume/overwrite; the checkpoint to resume from."""
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    if cfg.resume:
        latest = latest_checkpoint(ckpt_root)
        if latest is None:
            raise ConfigError(f"resume: no checkpoint in {ckpt_root} to continue from")
        return latest
    if (out / "metrics.jsonl").exists() or list_checkpoints(ckpt_root):
        if not cfg.overwrite:
            raise ConfigError(f"out directory {out} already holds a run; pass --resume to continue it, "
                              "--overwrite to replace it, or --out DIR for a new one")
    return None


def _validate(cfg: TrainConfig) -> tuple[TokenDataset, Any, Path | None]:
    """Everything that can be wrong with the input, checked before anything is written."""
    _device(cfg.device)
    tokenizer = cfg.load_tokenizer()
    model_config = cfg.model_config(tokenizer.vocab_size)  # before tokenizing: a too-small vocabulary fails fast
    check_model_parallel(cfg, model_config, cfg.world_size)
    ds = cfg.load_data(tokenizer, model_config)
    ds.check_block_size(model_config.block_size)
    resume_from = _prepare_out(cfg)
    if resume_from is not None:
        _check_resumed_canaries(cfg)
    return ds, model_config, resume_from


def _check_resumed_canaries(cfg: TrainConfig) -> None:
    """A resumed run must insert the canaries it started with (OUT/canaries.json): others would
    change its training data half-way and make the file lie about what was trained."""
    from parallax.eval.safety.canaries import CANARY_FILE, read_canaries

    path = Path(cfg.out) / CANARY_FILE
    try:
        started_with = read_canaries(path) if path.exists() else []
    except ValueError as exc:
        raise ConfigError(f"resume: {exc}") from None
    if started_with != cfg.canary_set():
        raise ConfigError(f"resume: --canaries/--canary-repeats/--canary-digits/--seed give other canaries than the "
                          f"run started with ({len(started_with)} in {path}); resume with the run's values")


def _write_canaries(cfg: TrainConfig) -> None:
    """OUT/canaries.json: the run's canaries, for measuring their exposure later (none: no file)."""
    from parallax.eval.safety.canaries import CANARY_FILE, write_canaries

    canaries = cfg.canary_set()
    if canaries:
        write_canaries(Path(cfg.out) / CANARY_FILE, canaries)
    else:
        (Path(cfg.out) / CANARY_FILE).unlink(missing_ok=True)  # a replaced run's canaries are not this run's


def validate_before_launch(cfg: TrainConfig) -> None:
    """Check ``cfg`` (and build the data cache once) before starting several ranks."""
    _validate(cfg)


def train(cfg: TrainConfig, *, progress: bool = True,
          on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; rank 0 writes the metrics and plot.

    The model runs under ``px.initialize`` with ``cfg.zero_stage`` on every rank (a single
    process gets a process group of world size 1). ``on_step(step, record)`` is called on
    every rank after each optimizer step (1-based step). Bad configuration raises
    ``ConfigError``/``DataError`` before anything is written.
    """
    if cfg.plan != "off":  # the CLI resolves it with the fields given explicitly; here the planner picks all
        cfg = resolve_plan(cfg)
    device = _device(cfg.device)
    ds, model_config, resume_from = _validate(cfg)
    created_group = not dist.is_initialized()
    info = init_from_env(device.type, cfg.timeout_s)
    try:
        mesh, shard = setup_mesh(cfg, info.rank, info.world_size)
        torch.manual_seed(cfg.seed)
        model = parallelize_for_training(cfg, cfg.build_model(model_config).to(device), mesh)
        model, optimizer = initialize(model, cfg.runtime_config(), optimizer_cls=AdamW,
                                      param_groups=param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                      group=None if mesh is None else mesh.dp_group)
        pipeline = pipeline_for_training(cfg, model, optimizer, mesh)
        start = 0
        if resume_from is not None:
            start = _resume(resume_from, model, optimizer, model_config, ds.tokenizer, cfg)
        out = Path(cfg.out)
        metrics = None
        if info.is_main:
            if cfg.overwrite:
                checkpoint.remove(out / "checkpoints")  # renamed away first: a kill leaves no partial checkpoint
                (out / "loss.png").unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            _write_canaries(cfg)
            metrics = MetricsLog(out / "metrics.jsonl", keep_through_step=start if resume_from else None)
            log.info("train: %s, %.2fM parameters (rank 0's), %d process(es), ZeRO stage %d, steps %d..%d on %s",
                     cfg.model_name, sum(p.numel() for p in model.parameters()) / 1e6, info.world_size, cfg.zero_stage,
                     start + 1, cfg.steps, device)
        cfg.prepare_training(model, ds, info, device, resuming=resume_from is not None)
        try:
            return _loop(cfg, ds, model, optimizer, info, device, start, metrics, progress, on_step,
                         _Parallel(shard, pipeline))
        finally:
            if metrics is not None:
                metrics.close()
    finally:
        if created_group:
            shutdown()


def _resume(path: Path, model: nn.Module, optimizer, model_config: ModelConfig, tokenizer, cfg: TrainConfig) -> int:
    manifest = checkpoint.read_manifest(path)
    # First: another tokenizer also changes the model's vocab_size, and this names the cause.
    saved_tokenizer = saved_tokenizer_reference(manifest)
    if saved_tokenizer["describe"] != tokenizer.describe():
        raise ConfigError(f"resume: the checkpoint {path} was trained with another tokenizer "
                          f"({saved_tokenizer['source']}) than --tokenizer {cfg.tokenizer_source}, whose ids differ; "
                          "resume with the run's tokenizer")
    saved = saved_model_config(manifest)
    if saved != model_config:
        raise ConfigError(f"resume: the checkpoint {path} holds a different model ({saved}) than this config "
                          f"({model_config})")
    if manifest["step"] >= cfg.steps:
        raise ConfigError(f"resume: checkpoint {path} is at step {manifest['step']}, steps is {cfg.steps}: nothing to do")
    checkpoint.load(path, model, optimizer)
    return int(manifest["step"])


@dataclass(frozen=True)
class _Parallel:
    """This rank's data shard and, under ``--pp``, the pipeline schedule that runs its stage."""

    shard: DataShard
    pipeline: Any = None


def _loop(cfg, ds, model, optimizer, info: DistInfo, device, start, metrics, progress, on_step,
          par: _Parallel) -> TrainResult:
    comm = zero_state(model).comm
    block_size = model.config.block_size
    bar = progress_bar(cfg.steps, "train", "step", enabled=progress and info.is_main, initial=start)
    # Every rank evaluates (stage 3 needs all of them for its gathers); rank 0 logs.
    initial = _evaluate(model, ds, cfg, block_size, device, par) if start == 0 else None
    initial_val = None if initial is None else initial["val_loss"]
    if metrics is not None and initial is not None:
        metrics.write({"step": 0, **initial})
    loss_value = val_loss = tokens_per_s = None
    window_tokens, window_start = 0, time.perf_counter()
    for step in range(start, cfg.steps):
        # Dropout, reproducible on resume; the ranks of one tensor/pipeline group draw alike.
        torch.manual_seed(_step_seed(cfg.seed, step, par.shard.rank))
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, tokens, stats = _accumulate(cfg, ds, model, optimizer, par, step, block_size, device)
        if cfg.grad_clip > 0:
            optimizer.clip_grad_norm_(cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        if step == start:
            report = memory_report(model, optimizer)
            memory_log.info("memory, rank %d of %d (ZeRO stage %d): parameters %.2f MB, gradients %.2f MB, "
                            "optimizer state %.2f MB", info.rank, info.world_size, report["stage"],
                            report["param_bytes"] / 2**20, report["grad_bytes"] / 2**20,
                            report["optimizer_bytes"] / 2**20)
        window_tokens += tokens
        done = step + 1
        record: dict[str, Any] = {"step": done}
        if done % cfg.log_interval == 0 or done == cfg.steps:
            loss_value = _global_mean(loss.detach(), comm)
            tokens_per_s = window_tokens / (time.perf_counter() - window_start)
            record.update(loss=loss_value, tokens_per_s=tokens_per_s, lr=lr)
            if stats:
                units = ds.window_targets(step, cfg.grad_accum, cfg.batch_size, block_size, par.shard.world_size,
                                          cfg.seed)
                record.update({name: _global_sum(value, comm) / units for name, value in stats.items()})
        if done % cfg.eval_interval == 0 or done == cfg.steps:
            record.update(_evaluate(model, ds, cfg, block_size, device, par))
            val_loss = record["val_loss"]
        if metrics is not None and len(record) > 1:
            metrics.write(record)
        if done % cfg.checkpoint_interval == 0 or done == cfg.steps:
            save_checkpoint(Path(cfg.out) / "checkpoints", model, optimizer, step=done,
                            config=cfg.to_dict() | {"data_hash": ds.content_hash}, model_config=model.config,
                            tokenizer=tokenizer_reference(ds.tokenizer), keep=cfg.keep_checkpoints,
                            is_main=info.is_main, metadata=cfg.checkpoint_metadata(model))
        if "loss" in record:  # restart the throughput window after logging, eval and checkpoint
            window_tokens, window_start = 0, time.perf_counter()
        if bar is not None:
            bar.update(1)
            if loss_value is not None:
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
        if on_step is not None:
            on_step(done, record)
    if bar is not None:
        bar.close()
    sample = _sample(model, ds, cfg, device) if par.pipeline is None else None  # a stage holds part of the model
    if info.is_main:
        plot_losses(Path(cfg.out) / "metrics.jsonl", Path(cfg.out) / "loss.png")
    return TrainResult(Path(cfg.out), cfg.steps, loss_value, val_loss, initial_val, tokens_per_s,
                       sample if info.is_main else None)


def _accumulate(cfg, ds, model: nn.Module, optimizer, par: _Parallel, step: int, block_size: int,
                device: torch.device) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """Forward and backward of optimizer step ``step``'s ``grad_accum`` micro-batches on this rank,
    gradients synced on the last; (this rank's share of the step's loss, tokens processed by all
    ranks, this rank's sums of the statistics ``cfg.batch_loss`` reports).

    The loss of the step is the mean over every target in the loss across micro-batches and
    ranks: each micro-batch's mean is weighted by its targets x world_size / the window's, so the
    gradient (averaged over ranks by ZeRO) equals one process taking the whole window at once,
    whatever the split (uneven when examples have different numbers of trained tokens). Ranks are
    data-parallel replicas here: the ranks of one tensor/pipeline group take the same batch.
    """
    replica, replicas = par.shard.rank, par.shard.world_size
    window = ds.window_targets(step, cfg.grad_accum, cfg.batch_size, block_size, replicas, cfg.seed)
    total = torch.zeros((), device=device)
    tokens = 0
    sums: dict[str, torch.Tensor] = {}
    for micro in range(cfg.grad_accum):
        batch = ds.get_batch("train", cfg.batch_size, block_size, step=step * cfg.grad_accum + micro, seed=cfg.seed,
                             rank=replica, world_size=replicas, device=device)  # (inputs, targets, ...)
        if par.pipeline is not None:  # forward and backward of every micro-batch, through the stages
            units, stats = int((batch[1] >= 0).sum()), {}
            weight = units * replicas / window
            loss = par.pipeline.train_step(batch[0], batch[1], weight=weight) * weight
        else:
            model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            loss, units, stats = cfg.batch_loss(model, batch)
            loss = loss * (units * replicas / window)
            optimizer.backward(loss)
        total += loss.detach().float()
        tokens += _batch_positions(batch) * replicas  # every replica's micro-batch has about this size
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
    return total, tokens, sums


def _batch_positions(batch) -> int:
    return batch.input_ids.numel() if hasattr(batch, "input_ids") else batch[0].numel()


def _global_sum(value: torch.Tensor, comm) -> float:
    value = value.float().clone()
    if comm.world_size > 1:
        comm.all_reduce(value, "all_reduce of a logged statistic").wait()
    return value.item()


def _global_mean(value: torch.Tensor, comm) -> float:
    value = value.float()
    if comm.world_size > 1:
        value = value.clone()
        comm.all_reduce(value, "all_reduce of the logged loss").wait()
        value /= comm.world_size
    return value.item()


def _sample(model: nn.Module, ds: TokenDataset, cfg: TrainConfig, device: torch.device) -> str | None:
    if cfg.sample_tokens == 0:
        return None
    prompt = torch.tensor([ds.tokenizer.encode(SAMPLE_PROMPT)], device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    model.eval()
    ids = model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=None, generator=generator)
    return ds.tokenizer.decode(ids[0].tolist())

