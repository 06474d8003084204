"""Rank-side code of tests/peft/test_lora_zero.py (spawned processes import it): a tiny Llama
with LoRA trained under ZeRO-3, and the same run in one process with plain PyTorch."""

from __future__ import annotations

import torch

import parallax as px
from parallax.models import Llama, LlamaConfig

VOCAB, BATCH, SEQ = 37, 4, 6


def lora_llama() -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=24,
                              block_size=16))
    return px.peft.get_peft_model(model, px.peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))
    return idx, torch.roll(idx, -1, dims=1)


def reference_run(steps: int) -> dict[str, torch.Tensor]:
    """One process, torch.optim.AdamW on the adapter parameters, the global batch."""
    model = lora_llama()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        model(*batch(step)).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def zero3_run(rank: int, world: int, steps: int, adapter_dir: str) -> dict:
    """ZeRO-3 over the world, each rank its slice of the batch; the full state, the memory report,
    the error merge() raises, and the adapter saved to adapter_dir (every rank calls save_adapter,
    rank 0 writes)."""
    model = px.zero.shard(lora_llama(), stage=3, timeout_s=60)
    opt = px.zero.ZeroOptimizer(model, px.optim.AdamW, lr=1e-2)
    local = BATCH // world
    for step in range(steps):
        idx, targets = batch(step)
        opt.backward(model(idx[rank * local:(rank + 1) * local], targets[rank * local:(rank + 1) * local]))
        opt.step()
        opt.zero_grad()
    model.save_adapter(adapter_dir)
    try:
        model.merge()
        merge_error = None
    except ValueError as err:
        merge_error = str(err)
    return {"state": px.zero.full_state_dict(model), "report": px.zero.memory_report(model, opt),
            "merge_error": merge_error}
