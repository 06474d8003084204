"""Rank-side code of the loss-scaler tests (spawned processes import it)."""

from __future__ import annotations

import torch
from torch import nn

import parallax as px
from tests.distributed import zero_workers as zw

BAD_PARAM = "blocks.1.proj.bias"


def _zero_model(stage: int, precision: str = "fp32"):
    torch.manual_seed(0)
    model = zw.TinyNet()
    return px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.0005, timeout_s=30, precision=precision),
                         param_groups=zw._groups(model), lr=1e-2, betas=(0.9, 0.95))


def _poison_grad(model: nn.Module, name: str, value: float):
    """A hook that puts ``value`` into one element of parameter ``name``'s gradient on this rank."""
    param = dict(model.named_parameters())[name]

    def hook(grad):
        grad = grad.clone()
        grad.view(-1)[0] = value
        return grad

    return param.register_hook(hook)


def _batch(rank: int, world: int, step: int):
    idx, tgt = zw._batches(step, 0, 4 * world, 5, 11)
    return idx[rank * 4:(rank + 1) * 4], tgt[rank * 4:(rank + 1) * 4]


def _zero_iteration(model, opt, scaler, rank, world, step, poison: str | None):
    """One GradScaler-style iteration with ``opt.backward``; rank 1 alone poisons ``poison``:
    'loss' (inf loss) or 'grad' (a NaN in BAD_PARAM's gradient). Returns (step skipped, scale,
    dtypes of the gradient shards)."""
    idx, tgt = _batch(rank, world, step)
    loss = model(idx, tgt)
    handle = None
    if rank == 1 and poison == "loss":
        loss = loss * float("inf")
    if rank == 1 and poison == "grad":
        handle = _poison_grad(model, BAD_PARAM, float("nan"))
    opt.backward(scaler.scale(loss))
    if handle is not None:
        handle.remove()
    grad_dtypes = {str(g.dtype) for g in opt.grad_shards()}
    scaler.unscale_(opt)
    opt.clip_grad_norm_(1.0)
    before = px.zero.full_state_dict(model)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    after = px.zero.full_state_dict(model)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    return unchanged, scaler.get_scale(), grad_dtypes


def overflow_on_one_rank(rank: int, world: int, cases: list[tuple[int, str]]) -> dict:
    """For each (stage, precision): clean, inf loss on rank 1, NaN gradient on rank 1, clean;
    which steps this rank skipped and the scale after each. Then a plain torch optimizer (no
    ZeRO) under the same process group."""
    out = {}
    for stage, precision in cases:
        model, opt = _zero_model(stage, precision)
        scaler = px.amp.LossScaler(init_scale=2.0**10, hysteresis=2, growth_interval=1000)
        skipped, scales, dtypes = [], [], set()
        for step, poison in enumerate([None, "loss", "grad", None]):
            unchanged, scale, grad_dtypes = _zero_iteration(model, opt, scaler, rank, world, step, poison)
            skipped.append(unchanged)
            scales.append(scale)
            dtypes |= grad_dtypes
        out[(stage, precision)] = {"skipped": skipped, "scales": scales, "grad_dtypes": sorted(dtypes)}

    # A plain optimizer under torch.distributed (as with DDP): found_inf is all-reduced as well.
    torch.manual_seed(0)
    plain = nn.Linear(4, 3)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    plain_scaler = px.amp.LossScaler(init_scale=8.0, hysteresis=1)
    plain_before = {k: v.clone() for k, v in plain.state_dict().items()}
    loss = plain(torch.ones(2, 4)).sum() * (float("inf") if rank == 1 else 1.0)
    plain_scaler.scale(loss).backward()
    plain_result = plain_scaler.step(plain_opt)
    plain_scaler.update()
    out["plain"] = {"skipped": all(torch.equal(v, plain_before[k]) for k, v in plain.state_dict().items()),
                    "result": plain_result, "scale": plain_scaler.get_scale()}
    return out


def error_at_min_scale(rank: int, world: int, stage: int) -> dict:
    """Rank 1 puts an inf into BAD_PARAM's gradient every step; every rank must raise the same
    LossScaleError at the same step, naming that parameter."""
    model, opt = _zero_model(stage)
    scaler = px.amp.LossScaler(init_scale=4.0, min_scale=1.0, hysteresis=1, max_consecutive_skips=4)
    handle = _poison_grad(model, BAD_PARAM, float("inf")) if rank == 1 else None
    scales = []
    for step in range(10):
        idx, tgt = _batch(rank, world, step)
        opt.backward(scaler.scale(model(idx, tgt)))
        try:
            scaler.step(opt)
        except px.amp.LossScaleError as exc:
            if handle is not None:
                handle.remove()
            return {"step": step, "parameters": exc.parameters, "message": str(exc), "scales": scales}
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    return {"step": None, "scales": scales}
