"""Rank-side code of the distillation ZeRO test (spawned processes import it): DistillConfig's
batch loss on a student under ZeRO against single-process torch.optim.AdamW on the same loss."""

from __future__ import annotations

import torch

import parallax as px
from parallax.compress.distill_config import DistillConfig

VOCAB, GLOBAL_BATCH, SEQ, STEPS = 257, 4, 12, 3
STUDENT = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16}


def _config(teacher: str, out: str) -> DistillConfig:
    return DistillConfig(teacher=teacher, student="tiny", model=dict(STUDENT), alpha=0.3, temperature=2.0,
                         divergence="forward_kl", out=out)


def _student(cfg: DistillConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return cfg.build_model(cfg.model_config())


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for s in range(STEPS):
        idx = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(s))
        targets = idx[:, 1:].clone()
        targets[0, :3] = -1  # ignored positions, as a packed or masked batch has
        out.append((idx[:, :-1], targets))
    return out


def parity(rank: int, world: int, teacher: str, out: str, stages: list[int]) -> dict:
    """Max |ZeRO - single process| over the student's state after STEPS steps, per stage (eps=1e-3:
    see tests/distributed/zero_workers.model_parity)."""
    cfg = _config(teacher, out)
    local = GLOBAL_BATCH // world
    ref = _student(cfg)
    cfg.prepare_training(ref, None, None, torch.device("cpu"), resuming=False)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, eps=1e-3)
    for idx, targets in _batches():
        for r in range(world):  # the global batch in the ranks' chunks (matmul rounding)
            rows = slice(r * local, (r + 1) * local)
            (cfg.batch_loss(ref, (idx[rows], targets[rows]))[0] / world).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    diffs = {}
    for stage in stages:
        model = _student(cfg)
        model.load_state_dict(init)
        model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.01), lr=3e-3,
                                   weight_decay=0.1, eps=1e-3)
        model.train()
        for idx, targets in _batches():
            rows = slice(rank * local, (rank + 1) * local)
            opt.backward(cfg.batch_loss(model, (idx[rows], targets[rows]))[0])
            opt.step()
            opt.zero_grad()
        full = px.zero.full_state_dict(model)
        diffs[stage] = max(float((full[k] - v).abs().max()) for k, v in ref.state_dict().items())
    return diffs
