"""Rank-side code of the stage-3 gathering tests (tests/distributed/test_zero3_gather.py).

Models with frozen parameters (the fine-tuning layouts: low-rank adapters beside frozen
weights, whole frozen blocks, a unit split over two flat buffers, a unit called twice, Hugging
Face GPT-2 with LoRA-style adapters) trained with SGD at stages 1-3 against a single-process
run; what was gathered at the start of each unit's backward; the measured peak of a ``no_sync``
micro-step; how gathers were served (prefetched or on demand); and units whose forward
activation checkpointing re-runs inside backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import parallax as px
from parallax.planner import CpuMemoryProfile
from parallax.zero.gather import Unit
from tests.distributed import zero_workers as zw

WIDTH = 64


class LowRankBlock(nn.Module):
    """The issue's reproducer: frozen LayerNorm and Linear(d, d) beside a trainable low-rank pair.

    ``low_rank_dtype`` puts the pair's first half in another dtype, so that the block's
    parameters live in two flat buffers at stage 3.
    """

    def __init__(self, width: int, rank: int = 4, low_rank_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.w = nn.Linear(width, width)
        self.a = nn.Linear(width, rank).to(low_rank_dtype)
        self.b = nn.Linear(rank, width)
        self.ln.requires_grad_(False)
        self.w.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, d)
        h = self.ln(x)
        return x + self.w(h) + self.b(self.a(h.to(self.a.weight.dtype)).to(h.dtype))


class Stack(nn.Module):
    """A trainable input layer, blocks, a trainable output layer; mean squared error."""

    def __init__(self, blocks: list[nn.Module], width: int = WIDTH) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # x, y: (B, d)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return nn.functional.mse_loss(self.out(h), y)


class TwoCalls(Stack):
    """Calls every block twice per layer, on h and on h reversed along the batch, and averages: the
    backwards of both calls are pending at once (the second call's runs first)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = (block(h) + block(h.flip(0))) / 2
        return nn.functional.mse_loss(self.out(h), y)


class LowRank(nn.Module):
    """A frozen Hugging Face ``Conv1D`` (weight (in, out)) plus a trainable ``B(A(x))``."""

    def __init__(self, base: nn.Module, rank: int = 4) -> None:
        super().__init__()
        fan_in, fan_out = base.weight.shape
        self.base = base
        self.a = nn.Linear(fan_in, rank, bias=False)
        self.b = nn.Linear(rank, fan_out, bias=False)
        nn.init.normal_(self.b.weight, std=0.02)  # not zero, so that A trains from the first step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.b(self.a(x))


def _gpt2_low_rank(checkpointing: bool) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=3, n_head=2, n_embd=32, n_positions=16, vocab_size=61, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.requires_grad_(False)
    for block in model.transformer.h:
        block.attn.c_attn = LowRank(block.attn.c_attn)
        block.attn.c_proj = LowRank(block.attn.c_proj)
        block.mlp.c_proj = LowRank(block.mlp.c_proj)
    if checkpointing:  # transformers >= 5 renamed it
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _llama_family(case: str) -> nn.Module:
    """Tiny Llama-family models: Qwen3-style (qk-norm, biases, tied head, explicit head_dim) and
    Mistral-style (sliding window shorter than the batch's 12 tokens, untied) under parallax's
    activation checkpointing: ZeRO units and checkpointed blocks are found without model code."""
    from parallax.models import Llama, LlamaConfig

    common = dict(block_size=16, vocab_size=61, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48)
    if case == "qwen3_tiny":
        return Llama(LlamaConfig(model_type="qwen3", qk_norm=True, attention_bias=True, head_dim=16,
                                 tie_word_embeddings=True, attention="math", **common))
    model = Llama(LlamaConfig(model_type="mistral", sliding_window=5, attention="sdpa", **common))
    return px.checkpoint.activation(model)


def build(case: str) -> nn.Module:
    """The model of ``case``, from the current random state."""
    if case == "low_rank":  # the reproducer of the issue
        return Stack([LowRankBlock(WIDTH) for _ in range(3)])
    if case == "frozen_blocks":  # blocks 1 and 2 have no trainable parameter at all
        model = Stack([LowRankBlock(WIDTH) for _ in range(4)])
        for block in model.blocks[1:3]:
            block.requires_grad_(False)
        return model
    if case == "two_calls":  # every block called twice per layer
        return TwoCalls([LowRankBlock(WIDTH) for _ in range(3)])
    if case == "two_buffers":  # every block: fp32 and fp64 parameters, both trained
        return Stack([LowRankBlock(WIDTH, low_rank_dtype=torch.float64) for _ in range(3)])
    if case in ("qwen3_tiny", "mistral_tiny_checkpointed"):
        return _llama_family(case)
    if case in ("gpt2_low_rank", "gpt2_low_rank_checkpointed"):
        return _gpt2_low_rank(checkpointing=case.endswith("checkpointed"))
    raise ValueError(f"unknown case {case!r}")


def _batch(case: str, step: int, size: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + step)
    if case.startswith(("gpt2", "qwen3", "mistral")):
        return (torch.randint(0, 61, (size, 12), generator=g),)
    return torch.randn(size, WIDTH, generator=g), torch.randn(size, WIDTH, generator=g)


def _loss(case: str, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if case.startswith("gpt2"):
        return model(input_ids=batch[0], labels=batch[0]).loss
    if case.startswith(("qwen3", "mistral")):
        return model(batch[0], batch[0])
    return model(*batch)


SGD = {"lr": 0.2, "momentum": 0.9}


def _reference(case: str, steps: int, world: int, device: str) -> tuple[dict[str, torch.Tensor], float]:
    """Single process, torch.optim.SGD over the global batch (in the ranks' chunks: same rounding).

    Returns the final state dict and the smallest change of a trainable parameter (max over its
    elements), which is > 0 when every trainable parameter trained.
    """
    torch.manual_seed(0)
    model = build(case).to(device)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], **SGD)
    for step in range(steps):
        batch = tuple(t.to(device) for t in _batch(case, step))
        local = batch[0].shape[0] // world
        for r in range(world):
            (_loss(case, model, tuple(t[r * local:(r + 1) * local] for t in batch)) / world).backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    moved = min(float((params[n].detach() - before).abs().max()) for n, before in trainable.items())
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, moved


def watch_unit_backwards(model: nn.Module) -> list[dict]:
    """At the start of each stage-3 unit's backward (after its gather): which units are gathered.

    Returns the list the samples are appended to: ``{"unit", "gathered", "resident"}`` with the
    indices of the gathered non-root units and the resident parameter bytes of the rank.
    """
    zs = model._parallax_zero
    samples: list[dict] = []

    def sample(unit_index: int) -> None:
        samples.append({"unit": unit_index, "gathered": [u.index for u in zs.units if u.gathered and not u.is_root],
                        "resident": sum(b.resident_param_bytes() for b in zs.buffers)})

    def arm(unit_index: int):
        # Registered after px.zero.shard's hooks, so these tensor hooks run after its gather.
        def hook(module, args, output):
            if torch.is_grad_enabled():
                for t in tree_flatten(output)[0]:
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(lambda grad: sample(unit_index))

        return hook

    for unit in zs.units:
        if not unit.is_root:
            unit.module.register_forward_hook(arm(unit.index))
    return samples


def residency_bounds(model: nn.Module) -> dict:
    """Bytes a stage-3 rank is allowed in backward: shards, the root, the two largest units."""
    zs = model._parallax_zero

    def full_bytes(unit: Unit) -> int:
        return sum(b.layout.padded_numel * b.full.element_size() for b in unit.buffers)

    unit_bytes = sorted(full_bytes(u) for u in zs.units if not u.is_root)
    return {"shards": sum(b.layout.shard_numel * b.full.element_size() for b in zs.buffers),
            "root": sum(full_bytes(u) for u in zs.units if u.is_root),
            "two_units": sum(unit_bytes[-2:]), "all_units": sum(unit_bytes)}


def frozen_parity(rank: int, world: int, cases: list[str], stages: list[int],
                  device: str = "cpu") -> dict[str, dict]:
    """For each case: see ``_frozen_parity``."""
    return {case: _frozen_parity(rank, world, case, stages, device) for case in cases}


def _frozen_parity(rank: int, world: int, case: str, stages: list[int], device: str, steps: int = 3) -> dict:
    """Per stage: max |ZeRO - single process| over the state dict after ``steps`` SGD steps;
    at stage 3 also the samples of ``watch_unit_backwards`` of the last step and the number of
    all-gathers issued for backward."""
    ref, moved = _reference(case, steps, world, device)
    out: dict = {"diff": {}, "moved": moved}
    for stage in stages:
        torch.manual_seed(0)
        model, opt = px.initialize(build(case).to(device), px.RuntimeConfig(zero_stage=stage, bucket_mb=0.01, timeout_s=60),
                                   optimizer_cls=torch.optim.SGD, **SGD)
        samples = watch_unit_backwards(model) if stage == 3 else []
        for step in range(steps):
            samples.clear()
            batch = tuple(t.to(device) for t in _batch(case, step))
            local = batch[0].shape[0] // world
            opt.backward(_loss(case, model, tuple(t[rank * local:(rank + 1) * local] for t in batch)))
            opt.step()
            opt.zero_grad()
        full = px.zero.full_state_dict(model)
        out["diff"][stage] = max(float((full[k].double() - v.double()).abs().max()) for k, v in ref.items())
        if stage == 3:
            out["samples"] = list(samples)
            out["bounds"] = residency_bounds(model)
            out["backward_gathers"] = sum(n for (phase, how), n in model._parallax_zero.gatherer.gathers.items()
                                          if phase == "backward" and how != "resident")
            out["units"], out["steps"] = len(model._parallax_zero.units) - 1, steps
        dist.barrier()
    return out


class Deep(nn.Module):
    """Many equal residual blocks whose parameters dwarf the activations of a small batch."""

    def __init__(self, width: int = WIDTH, depth: int = 16) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return nn.functional.mse_loss(x, y)


def no_sync_peaks(rank: int, world: int, stages: list[int]) -> dict[int, dict]:
    """For each stage: see ``_no_sync_peak``."""
    return {stage: _no_sync_peak(stage) for stage in stages}


def _no_sync_peak(stage: int) -> dict:
    """Measured peak bytes (CpuMemoryProfile) of a gradient-accumulation micro-step (no_sync),
    after a synced step and a forward without backward, and the samples of
    ``watch_unit_backwards`` during it (stage 3)."""
    prof = CpuMemoryProfile()
    with prof:
        torch.manual_seed(0)
        model, opt = px.initialize(Deep(), px.RuntimeConfig(zero_stage=stage, bucket_mb=0.01, timeout_s=60),
                                   optimizer_cls=torch.optim.SGD, lr=0.1)
        samples = watch_unit_backwards(model) if stage == 3 else []
        x, y = torch.randn(2, WIDTH), torch.randn(2, WIDTH)
        opt.backward(model(x, y))
        opt.step()
        opt.zero_grad()
        model(x, y)  # a forward whose graph is dropped without backward must not keep units gathered later
        samples.clear()
        with prof.window("micro-step"), model.no_sync():
            opt.backward(model(x, y))
    out = {"peak": prof.peak("micro-step")[0], "samples": samples}
    if stage == 3:
        out["bounds"] = residency_bounds(model)
    return out


def prefetch_counts(rank: int, world: int, prefetches: list[int]) -> dict[int, dict]:
    """For each prefetch depth: see ``_prefetch_counts``."""
    return {prefetch: _prefetch_counts(rank, world, prefetch) for prefetch in prefetches}


def _prefetch_counts(rank: int, world: int, prefetch: int, steps: int = 3) -> dict:
    """How stage-3 gathers were served (prefetched, on demand, resident) after the first step."""
    torch.manual_seed(0)
    model = zw.TinyNet(depth=4)
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=3, prefetch=prefetch, timeout_s=60), lr=1e-2)
    gatherer = model._parallax_zero.gatherer
    for step in range(steps):
        if step == 1:  # the first step has no recorded order to prefetch from
            gatherer.gathers.clear()
        idx, tgt = zw._batches(step, 0, 2 * world, 5, 11)  # 2 sequences per rank
        opt.backward(model(idx[2 * rank:2 * rank + 2], tgt[2 * rank:2 * rank + 2]))
        opt.step()
        opt.zero_grad()
    return {"gathers": dict(gatherer.gathers), "units": len(model._parallax_zero.units) - 1,
            "steady_steps": steps - 1}


class CheckpointedCalls(zw.TinyNet):
    """TinyNet whose forward checkpoints each block's ``__call__`` (hooks included) without early
    stop: the recompute runs each block's whole forward, through its hooks, after the block's
    backward has started."""

    def forward(self, idx, targets):
        x = self.embed(idx) + self.frozen.sum()
        with set_checkpoint_early_stop(False):
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        return nn.functional.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def checkpointed_units(rank: int, world: int, layouts: list[str], prefetches: list[int]) -> dict[tuple, dict]:
    """For each layout and prefetch depth: see ``_checkpointed_units``."""
    return {(layout, prefetch): _checkpointed_units(rank, world, layout, prefetch)
            for layout in layouts for prefetch in prefetches}


def _checkpointed_units(rank: int, world: int, layout: str, prefetch: int, steps: int = 4) -> dict:
    """Stage-3 units whose forward activation checkpointing re-runs inside backward, through their
    hooks: "sub_units": ``px.checkpoint.activation`` on whole blocks, each block's fc and proj
    being units (re-run before their own backward starts); "calls": ``CheckpointedCalls`` (each
    block re-run after its backward started). Max |ZeRO - single-process AdamW| after ``steps``
    and the samples of ``watch_unit_backwards`` of the last step."""
    ref_state, _ = zw.reference_run(steps, 1, None)
    torch.manual_seed(0)
    if layout == "sub_units":
        model = px.checkpoint.activation(zw.TinyNet())
        units = [m for block in model.blocks for m in (block.fc, block.proj)]
    elif layout == "calls":
        model, units = CheckpointedCalls(), None
    else:
        raise ValueError(f"unknown layout {layout!r}")
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=3, prefetch=prefetch, timeout_s=60), units=units,
                               param_groups=zw._groups(model), lr=1e-2, betas=(0.9, 0.95))
    samples = watch_unit_backwards(model)
    for step in range(steps):
        samples.clear()
        zw._train_steps(model, opt, rank, world, 1, start=step)
    full = px.zero.full_state_dict(model)
    return {"diff": max(float((full[k] - v).abs().max()) for k, v in ref_state.items()), "samples": samples,
            "bounds": residency_bounds(model)}
