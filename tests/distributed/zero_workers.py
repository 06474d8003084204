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
             global_batch: int = 8, seq: int = 5, optimizer_cls=None):
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
            model.set_requires_gradient_sync(micro == accum - 1)
            opt.backward(model(idx, tgt) / accum)
        if clip is not None:
            norms.append(float(opt.clip_grad_norm_(clip)))
        opt.step()
        opt.zero_grad()
    return px.zero.full_state_dict(model), norms, px.zero.memory_report(model, opt)


def parity(rank: int, world: int, cases: list[tuple]) -> list[dict]:
    """For each (stage, steps, accum, clip): max |zero - reference| per state entry, and norms."""
    out = []
    for stage, steps, accum, clip in cases:
        state, norms, report = zero_run(rank, world, stage, steps, accum, clip)
        ref_state, ref_norms = reference_run(steps, accum, clip)
        diffs = {k: float((state[k] - ref_state[k]).abs().max()) for k in ref_state}
        out.append({"case": (stage, steps, accum, clip), "diffs": diffs, "norms": norms, "ref_norms": ref_norms,
                    "report": report})
        dist.barrier()
    return out
