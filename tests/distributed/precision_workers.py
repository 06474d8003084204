"""Rank-side code of the precision and offload tests."""

from __future__ import annotations

import torch

import parallax as px
from tests.distributed import zero_workers as zw


def tiny_net_run(rank: int, world: int, stage: int, offload: str, precision: str, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    model = zw.TinyNet().to(device)
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.0005, offload=offload,
                                                       precision=precision),
                               param_groups=zw._groups(model), lr=1e-2, betas=(0.9, 0.95))
    zw._train_steps(model, opt, rank, world, 6, device=device)
    report = px.zero.memory_report(model, opt)
    shard_params = sum(r.param.numel() for r in opt.runs)
    largest = max(b.layout.shard_numel for b in model._parallax_zero.buffers)
    host = opt.inner.host_bytes() if offload == "cpu" else None
    return {"state": px.zero.full_state_dict(model), "report": report, "shard_params": shard_params,
            "largest_shard": largest, "host_bytes": host, "dtype": str(next(model.parameters()).dtype)}


def gpt_losses(rank: int, world: int, precision: str, stage: int, steps: int, device: str = "cpu") -> list[float]:
    """The tiny GPT on the built-in corpus: the loss of each of ``steps`` steps."""
    from parallax.data import load_dataset
    from parallax.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", n_layer=2, n_embd=64, n_head=2, block_size=64)).to(device)
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=stage, precision=precision), lr=3e-3,
                               betas=(0.9, 0.95), weight_decay=0.1)
    ds = load_dataset()
    losses = []
    for step in range(steps):
        x, y = ds.get_batch("train", 8, 64, step=step, seed=0, rank=rank, world_size=world, device=device)
        loss = model(x, y)
        opt.backward(loss)
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach().float()))
    return losses


def bf16_to_fp32_resume(rank: int, world: int, directory: str) -> float:
    """A bf16 run's checkpoint resumed in fp32 starts from the fp32 master weights, not the bf16 copies."""
    torch.manual_seed(0)
    model = zw.TinyNet()
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=2, precision="bf16", bucket_mb=0.0005),
                               param_groups=zw._groups(model), lr=1e-2)
    zw._train_steps(model, opt, rank, world, 3)
    px.checkpoint.save(directory, model, opt, step=3)
    masters = {}
    for run in opt.runs:
        seg = run.segment
        masters[(seg.name, seg.start, seg.end)] = opt.inner.state[run.param]["master_param"].clone()
    fresh = zw.TinyNet()
    fresh, fresh_opt = px.initialize(fresh, px.RuntimeConfig(zero_stage=2, bucket_mb=0.0005),
                                     param_groups=zw._groups(fresh), lr=1e-2)
    px.checkpoint.load(directory, fresh, fresh_opt)
    full = px.zero.full_state_dict(fresh)
    assert all(t.dtype == torch.float32 for t in full.values())
    return max(float((full[name].reshape(-1)[start:end] - master).abs().max())
               for (name, start, end), master in masters.items())


def fp16_overflow_on_one_rank(rank: int, world: int, directory: str) -> dict:
    """fp16 through px.initialize: the optimizer's own loss scaler skips an overflow on every rank."""
    torch.manual_seed(0)
    model = zw.TinyNet()
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=3, precision="fp16", bucket_mb=0.0005),
                               lr=1e-2)
    opt.loss_scaler = px.amp.LossScaler(init_scale=2.0**8, hysteresis=1)
    local = 8 // world
    scales, skipped = [], []
    for step in range(4):
        idx, tgt = zw._batches(step, 0, 8, 5, 11)
        loss = model(idx[rank * local:(rank + 1) * local], tgt[rank * local:(rank + 1) * local])
        if step == 2 and rank == 1:
            loss = loss * float("inf")
        before = px.zero.full_state_dict(model)
        opt.backward(loss)
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        after = px.zero.full_state_dict(model)
        skipped.append(all(torch.equal(before[k], after[k]) for k in before))
        scales.append(opt.loss_scaler.get_scale())
    px.checkpoint.save(directory, model, opt, step=4)
    fresh = zw.TinyNet()
    fresh, fresh_opt = px.initialize(fresh, px.RuntimeConfig(zero_stage=1, precision="fp16"), lr=1e-2)
    px.checkpoint.load(directory, fresh, fresh_opt)
    return {"skipped": skipped, "scales": scales, "restored_scale": fresh_opt.loss_scaler.get_scale()}
