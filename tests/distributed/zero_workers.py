"""Rank-side code of the ZeRO tests (spawned processes import it)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import parallax as px


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 13)  # 13 * width + 13: not divisible by 2 or 4
        self.proj = nn.Linear(13, width)

    def forward(self, x):
        return x + self.proj(torch.tanh(self.fc(self.norm(x))))


class TinyNet(nn.Module):
    """Odd sizes, a frozen parameter, tied input/output weights and repeated blocks."""

    def __init__(self, vocab: int = 11, width: int = 7, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, idx, targets):
        x = self.embed(idx) + self.frozen.sum()
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _groups(model: nn.Module) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def _batches(step: int, micro: int, global_batch: int, seq: int, vocab: int):
    g = torch.Generator().manual_seed(1000 + 10 * step + micro)
    idx = torch.randint(0, vocab, (global_batch, seq), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def reference_run(steps: int, accum: int, clip: float | None, global_batch: int = 8, seq: int = 5):
    """Single process, plain torch.optim.AdamW on the global batch."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(_groups(model), lr=1e-2, betas=(0.9, 0.95))
    norms = []
    for step in range(steps):
        for micro in range(accum):
            idx, tgt = _batches(step, micro, global_batch, seq, 11)
            (model(idx, tgt) / accum).backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, norms


def zero_run(rank: int, world: int, stage: int, steps: int, accum: int, clip: float | None,
             sync_every_micro_step: bool = False, global_batch: int = 8, seq: int = 5, optimizer_cls=None):
    torch.manual_seed(0)
    model = TinyNet()
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.0005, timeout_s=60),
                               optimizer_cls=optimizer_cls or px.optim.AdamW, param_groups=_groups(model),
                               lr=1e-2, betas=(0.9, 0.95))
    local = global_batch // world
    norms = []
    for step in range(steps):
        for micro in range(accum):
            idx, tgt = _batches(step, micro, global_batch, seq, 11)
            idx, tgt = idx[rank * local:(rank + 1) * local], tgt[rank * local:(rank + 1) * local]
            model.set_requires_gradient_sync(sync_every_micro_step or micro == accum - 1)
            opt.backward(model(idx, tgt) / accum)
        if clip is not None:
            norms.append(float(opt.clip_grad_norm_(clip)))
        opt.step()
        opt.zero_grad()
    return px.zero.full_state_dict(model), norms, px.zero.memory_report(model, opt)


def parity(rank: int, world: int, cases: list[tuple]) -> list[dict]:
    """For each (stage, steps, accum, clip, sync every micro-step): max |zero - reference| per
    state entry, and the clipped norms."""
    out = []
    for stage, steps, accum, clip, sync_all in cases:
        state, norms, report = zero_run(rank, world, stage, steps, accum, clip, sync_all)
        ref_state, ref_norms = reference_run(steps, accum, clip)
        diffs = {k: float((state[k] - ref_state[k]).abs().max()) for k in ref_state}
        out.append({"case": (stage, steps, accum, clip, sync_all), "diffs": diffs, "norms": norms, "ref_norms": ref_norms,
                    "report": report})
        dist.barrier()
    return out


def _train_steps(model, opt, rank, world, steps, start=0, global_batch=8, seq=5, device="cpu"):
    local = global_batch // world
    losses = []
    for step in range(start, start + steps):
        idx, tgt = (t.to(device) for t in _batches(step, 0, global_batch, seq, 11))
        loss = model(idx[rank * local:(rank + 1) * local], tgt[rank * local:(rank + 1) * local])
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        total = loss.detach().float().clone()
        model._parallax_zero.comm.all_reduce(total, "all_reduce of the test loss").wait()
        losses.append(float(total) / world)
    return losses


def reference_losses(steps: int, global_batch: int = 8, seq: int = 5) -> list[float]:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(_groups(model), lr=1e-2, betas=(0.9, 0.95))
    losses = []
    for step in range(steps):
        idx, tgt = _batches(step, 0, global_batch, seq, 11)
        loss = model(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def save_after(rank: int, world: int, stage: int, steps: int, directory: str) -> list[float]:
    torch.manual_seed(0)
    model = TinyNet()
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.0005, timeout_s=60),
                               param_groups=_groups(model), lr=1e-2, betas=(0.9, 0.95))
    losses = _train_steps(model, opt, rank, world, steps)
    px.checkpoint.save(directory, model, opt, step=steps, extra={"note": "test"})
    return losses


def resume_from(rank: int, world: int, stage: int, steps: int, directory: str) -> list[float]:
    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    model = TinyNet()
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.0005, timeout_s=60),
                               param_groups=_groups(model), lr=5.0, betas=(0.5, 0.5))
    manifest = px.checkpoint.load(directory, model, opt)
    assert manifest["extra"] == {"note": "test"}
    assert opt.param_groups is opt.inner.param_groups, "an lr scheduler would not reach the loaded optimizer"
    return _train_steps(model, opt, rank, world, steps, start=manifest["step"])


def memory_bounds(rank: int, world: int, stage: int, prefetch: int) -> dict:
    """Model-state bytes this rank holds after steps, and the stage-3 peak of resident parameters."""
    torch.manual_seed(0)
    model = TinyNet(vocab=101, width=24, depth=4)
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.01, prefetch=prefetch),
                               lr=1e-2)
    zs = model._parallax_zero
    peak = {"resident": 0}

    def record(*_):
        peak["resident"] = max(peak["resident"], sum(b.resident_param_bytes() for b in zs.buffers))

    for block in model.blocks:
        block.register_forward_hook(record)
    for step in range(2):
        idx, tgt = _batches(step, 0, 4 * world, 6, 101)
        opt.backward(model(idx, tgt))
        opt.step()
        opt.zero_grad()
    report = px.zero.memory_report(model, opt)
    report["peak_resident_param_bytes"] = peak["resident"]
    report["num_buffers"] = len(zs.buffers)
    report["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report["unit_bytes"] = sorted(sum(b.layout.padded_numel * 4 for b in u.buffers) for u in zs.units if not u.is_root)
    report["root_bytes"] = sum(b.layout.padded_numel * 4 for u in zs.units if u.is_root for b in u.buffers)
    report["shard_bytes"] = sum(b.layout.shard_numel * 4 for b in zs.buffers)
    return report


def die_mid_step(rank: int, world: int, timeout_s: float):
    """Rank 1 exits during step 2's backward; the others must fail with a clear error in time."""
    import os
    import time

    torch.manual_seed(0)
    model = TinyNet()
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=2, bucket_mb=0.0005, timeout_s=timeout_s), lr=1e-2)
    start = time.monotonic()
    for step in range(4):
        idx, tgt = _batches(step, 0, 2 * world, 5, 11)
        loss = model(idx, tgt)
        if step == 2 and rank == 1:
            os._exit(1)
        start = time.monotonic()
        try:
            opt.backward(loss)
            opt.step()
        except px.zero.CollectiveError as exc:
            return {"error": str(exc), "seconds": time.monotonic() - start}
        opt.zero_grad()
    return {"error": None, "seconds": time.monotonic() - start}


class Reorder(TinyNet):
    """Runs its blocks in reverse order on odd steps: the recorded stage-3 order mispredicts."""

    reverse = False

    def forward(self, idx, targets):
        x = self.embed(idx) + self.frozen.sum()
        for block in (reversed(self.blocks) if self.reverse else self.blocks):
            x = block(x)
        return nn.functional.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def order_change(rank: int, world: int, prefetch: int) -> dict:
    torch.manual_seed(0)
    ref = Reorder()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model, opt = px.initialize(Reorder(), px.RuntimeConfig(zero_stage=3, prefetch=prefetch, timeout_s=30), lr=1e-2)
    local = 8 // world
    for step in range(6):
        model.reverse = ref.reverse = step % 2 == 1
        idx, tgt = _batches(step, 0, 8, 5, 11)
        ref(idx, tgt).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        opt.backward(model(idx[rank * local:(rank + 1) * local], tgt[rank * local:(rank + 1) * local]))
        opt.step()
        opt.zero_grad()
    full = px.zero.full_state_dict(model)
    return {"diff": max(float((full[k] - v).abs().max()) for k, v in ref.state_dict().items()),
            "order_changes": model._parallax_zero.gatherer.order_changes}


def _gpt(kind: str):
    if kind == "gpt":
        from parallax.models import GPT, GPTConfig

        return GPT(GPTConfig.from_preset("tiny", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=61))
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=61, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _gpt_loss(model, kind, idx):
    if kind == "gpt":
        return model(idx[:, :-1], idx[:, 1:])
    return model(input_ids=idx, labels=idx).loss


def model_parity(rank: int, world: int, kind: str, stages: list[int]) -> dict:
    """The reference GPT or a Hugging Face GPT2LMHeadModel: ZeRO vs single-process AdamW, 4 steps.

    Attention's key bias has an exactly-zero true gradient (softmax ignores a per-query constant),
    so its computed gradient is rounding noise that Adam normalises into +-lr updates: any change
    of summation order (single process vs all-reduce) moves it by ~5e-6. eps=1e-3 keeps that
    noise below 1e-8 in the comparison with the single-process run; the stages are also compared
    with stage 0 (plain data parallelism) at the default eps, where they must agree exactly.
    """
    out: dict = {}
    batches = [torch.randint(0, 61, (4, 12), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    local = 4 // world
    for eps in (1e-3, 1e-8):
        torch.manual_seed(0)
        ref = _gpt(kind)
        init = {k: v.clone() for k, v in ref.state_dict().items()}
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, eps=eps)
        for idx in batches:
            for r in range(world):  # the global batch in the ranks' chunks (matmul rounding)
                (_gpt_loss(ref, kind, idx[r * local:(r + 1) * local]) / world).backward()
            ref_opt.step()
            ref_opt.zero_grad()
        finals = {}
        for stage in stages:
            model = _gpt(kind)
            model.load_state_dict(init)
            model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.01), lr=3e-3,
                                       weight_decay=0.1, eps=eps)
            for idx in batches:
                opt.backward(_gpt_loss(model, kind, idx[rank * local:(rank + 1) * local]))
                opt.step()
                opt.zero_grad()
            finals[stage] = px.zero.full_state_dict(model)
        for stage, full in finals.items():
            other = ref.state_dict() if eps == 1e-3 else finals[stages[0]]
            out[(eps, stage)] = max(float((full[k] - v).abs().max()) for k, v in other.items() if k in full)
    return out


def checkpointed_parity(rank: int, world: int, stages: list[int], prefetch: int) -> dict:
    """Activation checkpointing ("block") on top of ZeRO: the same parameters as plain AdamW."""
    ref_state, _ = reference_run(6, 1, None)
    out = {}
    for stage in stages:
        torch.manual_seed(0)
        model = TinyNet()
        model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.0005, prefetch=prefetch,
                                                           activation_checkpointing=True),
                                   param_groups=_groups(model), lr=1e-2, betas=(0.9, 0.95))
        _train_steps(model, opt, rank, world, 6)
        full = px.zero.full_state_dict(model)
        out[stage] = max(float((full[k] - v).abs().max()) for k, v in ref_state.items())
    return out
