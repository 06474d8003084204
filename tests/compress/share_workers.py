"""Rank-side code of the weight-sharing ZeRO test (spawned processes import it): a model whose
blocks are shared (``share_layers``) trained under ZeRO against single-process torch.optim.AdamW."""

from __future__ import annotations

import torch

import parallax as px
from parallax.models import from_preset

VOCAB, GLOBAL_BATCH, SEQ, STEPS = 61, 4, 12, 3


def shared_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt":
        return from_preset("tiny", n_layer=4, share_layers=2, n_head=2, n_embd=16, block_size=16, vocab_size=VOCAB)
    return from_preset("llama-tiny", n_layer=4, share_layers=2, n_head=2, n_kv_head=1, n_embd=16,
                       intermediate_size=24, block_size=16, vocab_size=VOCAB, tie_word_embeddings=True)


def _batches() -> list[torch.Tensor]:
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(s))
            for s in range(STEPS)]


def _loss(model, idx: torch.Tensor) -> torch.Tensor:
    return model(idx[:, :-1], idx[:, 1:])


def parity(rank: int, world: int, families: list[str], cases: list[tuple[int, str]]) -> dict:
    """``family_parity`` of each family, by family."""
    return {family: family_parity(rank, world, family, cases) for family in families}


def family_parity(rank: int, world: int, family: str, cases: list[tuple[int, str]]) -> dict:
    """Max |ZeRO - single process| over the state dict after STEPS AdamW steps, for each (stage,
    activation checkpointing); and how many values each stage keeps per parameter (the shared
    blocks once). eps=1e-3: see tests/distributed/zero_workers.model_parity."""
    batches = _batches()
    local = GLOBAL_BATCH // world
    ref = shared_model(family)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, eps=1e-3)
    for idx in batches:
        for r in range(world):  # the global batch in the ranks' chunks (matmul rounding)
            (_loss(ref, idx[r * local:(r + 1) * local]) / world).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    out: dict = {}
    for stage, checkpointing in cases:
        model = shared_model(family)
        model.load_state_dict(init)
        config = px.RuntimeConfig(zero_stage=stage, bucket_mb=0.01, activation_checkpointing=checkpointing)
        model, opt = px.initialize(model, config, lr=3e-3, weight_decay=0.1, eps=1e-3)
        for idx in batches:
            opt.backward(_loss(model, idx[rank * local:(rank + 1) * local]))
            opt.step()
            opt.zero_grad()
        full = px.zero.full_state_dict(model)
        state = px.zero.module.zero_state(model)
        out[(stage, checkpointing)] = {
            "diff": max(float((full[k] - v).abs().max()) for k, v in ref.state_dict().items()),
            "stored": sum(b.layout.numel for b in state.buffers),
            "units": len(state.units),
        }
    out["params"] = sum(p.numel() for p in ref.parameters())
    return out
