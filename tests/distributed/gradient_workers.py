"""Rank-side code of the ZeRO gradient tests: parameters unused in a step, clipping, reduced gradients.

Every run is compared with a single-process plain-PyTorch run on the same global batch, which
each rank's chunk of is computed separately (so the matmuls round alike) and averaged as data
parallelism averages it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import parallax as px

VOCAB, WIDTH, SEQ, GLOBAL_BATCH = 11, 7, 5, 8
# Small enough that the conditional head and block 2's expert (each registered last) fill flat
# buffers of their own in stages 0-2: whole buffers unused on one rank and used on another.
TINY_BUCKET_MB = 100 / 2**20
ONE_BUCKET_MB = 25.0  # stages 0-2: the whole model in one flat buffer (used and unused parameters mixed)


class GatedBlock(nn.Module):
    """A residual MLP block with an optional "expert" branch (mixture-of-experts routing)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 13)
        self.proj = nn.Linear(13, width)
        self.expert = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, use_expert: bool) -> torch.Tensor:
        x = x + self.proj(torch.tanh(self.fc(self.norm(x))))
        return x + self.expert(x) if use_expert else x


@dataclass(frozen=True)
class Gate:
    """What runs in one micro-step on one rank."""

    skip: frozenset = frozenset()  # blocks dropped (LayerDrop)
    experts: frozenset = frozenset()  # blocks whose expert branch runs (routing)
    aux: bool = False  # the conditional head (in the stage-3 root unit)


class GatedNet(nn.Module):
    """Three gated blocks (the stage-3 units) and a conditional auxiliary head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(GatedBlock(WIDTH) for _ in range(3))
        self.head = nn.Linear(WIDTH, VOCAB)
        self.aux = nn.Linear(WIDTH, VOCAB)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, gate: Gate = Gate()) -> torch.Tensor:
        x = self.embed(idx)  # (B, T, WIDTH)
        for i, block in enumerate(self.blocks):
            if i not in gate.skip:
                x = block(x, i in gate.experts)
        logits = self.head(x) + self.aux(x) if gate.aux else self.head(x)  # (B, T, VOCAB)
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


# The gate of (step, micro-step, rank).
Gates = Callable[[int, int, int], Gate]
BLOCK_2 = frozenset({2})
# Per step, ranks 0 and 1: both, rank 0 only, rank 1 only, neither, both, rank 1 only (ranks >= 2 never).
_BY_RANK = [(1, 1), (1, 0), (0, 1), (0, 0), (1, 1), (0, 1)]


def _used_by(step: int, rank: int) -> bool:
    return rank < 2 and bool(_BY_RANK[step % len(_BY_RANK)][rank])


def _layerdrop(step: int, micro: int, rank: int) -> Gate:
    """Block 1 dropped by every rank on odd steps."""
    return Gate(skip=frozenset({1}) if step % 2 else frozenset(), experts=BLOCK_2)


def _heads(step: int, micro: int, rank: int) -> Gate:
    """The conditional head, used by both ranks, one or none (data-dependent, as a per-task head)."""
    return Gate(experts=BLOCK_2, aux=_used_by(step, rank))


def _routing(step: int, micro: int, rank: int) -> Gate:
    """Block 2's expert used by both ranks, one or none; the head by others (data-dependent)."""
    return Gate(experts=BLOCK_2 if _used_by(step, rank) else frozenset(), aux=_used_by(step + 2, rank))


def _accumulation(step: int, micro: int, rank: int) -> Gate:
    """Two micro-steps per step: the head used in micro-step 0 of even steps on rank 0 and in
    micro-step 1 of steps 1 and 2 on rank 1; block 0 dropped in micro-step 1 of step 3."""
    aux = (step % 2 == 0 and micro == 0 and rank == 0) or (step in (1, 2) and micro == 1 and rank == 1)
    return Gate(skip=frozenset({0}) if (step, micro) == (3, 1) else frozenset(), experts=BLOCK_2, aux=aux)


def _always(step: int, micro: int, rank: int) -> Gate:
    return Gate(experts=frozenset({0, 1, 2}), aux=True)


@dataclass(frozen=True)
class Schedule:
    gates: Gates
    accum: int = 1  # micro-steps per step
    bucket_mb: float = TINY_BUCKET_MB
    set_to_none: bool = True  # zero_grad(set_to_none=...) on both sides


SCHEDULES = {
    "layerdrop": Schedule(_layerdrop, bucket_mb=ONE_BUCKET_MB),
    # torch keeps a zero gradient for every parameter that had one: the dropped block is stepped.
    "layerdrop_zeroed": Schedule(_layerdrop, bucket_mb=ONE_BUCKET_MB, set_to_none=False),
    "heads": Schedule(_heads),
    "routing": Schedule(_routing),
    "accumulation": Schedule(_accumulation, accum=2),
    "always": Schedule(_always),
}


@dataclass(frozen=True)
class Optim:
    ours: type[torch.optim.Optimizer]  # what ZeroOptimizer wraps
    reference: type[torch.optim.Optimizer]
    kwargs: dict
    offload: str = "none"


_ADAMW = {"lr": 1e-2, "weight_decay": 0.1}
OPTIMIZERS = {
    "sgd": Optim(torch.optim.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adamw": Optim(px.optim.AdamW, torch.optim.AdamW, _ADAMW),
    "adamw_offload": Optim(px.optim.AdamW, torch.optim.AdamW, _ADAMW, offload="cpu"),  # HostAdamW, stages 1-3
}


def _batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + 10 * step + micro)
    idx = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def _chunk(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    local = GLOBAL_BATCH // world
    return t[rank * local:(rank + 1) * local]


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _differences(ours: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor | None]) -> dict[str, float]:
    """max |ours - ref| per name; inf where one has a gradient and the other has none."""
    out = {}
    for name, r in ref.items():
        o = ours[name]
        if (o is None) != (r is None):
            out[name] = float("inf")
        else:
            out[name] = 0.0 if o is None else float((o - r).abs().max())
    return out


class Reference:
    """Single-process plain PyTorch on the global batch, one rank's chunk at a time."""

    def __init__(self, world: int, optim: Optim) -> None:
        torch.manual_seed(0)
        self.model = GatedNet()
        self.opt = optim.reference(self.model.parameters(), **optim.kwargs)
        self.world = world

    def backward(self, step: int, gates: Gates, accum: int) -> dict[str, torch.Tensor | None]:
        """Gradients of one step (None for parameters no chunk used, as torch leaves them)."""
        for micro in range(accum):
            idx, tgt = _batch(step, micro)
            for r in range(self.world):
                loss = self.model(_chunk(idx, r, self.world), _chunk(tgt, r, self.world), gates(step, micro, r))
                (loss / (self.world * accum)).backward()
        return _grads(self.model)

    def clip(self, max_norm: float, norm_type: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, norm_type))

    def step(self, set_to_none: bool = True) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=set_to_none)


def _sharded(stage: int, bucket_mb: float, optim: Optim):
    torch.manual_seed(0)
    config = px.RuntimeConfig(zero_stage=stage, bucket_mb=bucket_mb, offload=optim.offload, timeout_s=30)
    return px.initialize(GatedNet(), config, optimizer_cls=optim.ours, **optim.kwargs)


def _backward(model, opt, rank: int, world: int, step: int, gates: Gates, accum: int) -> None:
    for micro in range(accum):
        idx, tgt = _batch(step, micro)
        model.set_requires_gradient_sync(micro == accum - 1)
        opt.backward(model(_chunk(idx, rank, world), _chunk(tgt, rank, world), gates(step, micro, rank)) / accum)


def unused_parameters(rank: int, world: int, cases: list[tuple[str, str, int]], steps: int) -> list[dict]:
    """For each (schedule, optimizer, stage): the worst gradient difference over the steps
    (px.zero.full_grads vs torch's p.grad, None-ness included) and the final parameter
    differences, per parameter name."""
    out = []
    for schedule, opt_name, stage in cases:
        plan = SCHEDULES[schedule]
        optim = OPTIMIZERS[opt_name]
        ref = Reference(world, optim)
        model, opt = _sharded(stage, plan.bucket_mb, optim)
        grad_diffs: dict[str, float] = {}
        for step in range(steps):
            ref_grads = ref.backward(step, plan.gates, plan.accum)
            _backward(model, opt, rank, world, step, plan.gates, plan.accum)
            for name, d in _differences(px.zero.full_grads(model), ref_grads).items():
                grad_diffs[name] = max(grad_diffs.get(name, 0.0), d)
            ref.step(plan.set_to_none)
            opt.step()
            opt.zero_grad(set_to_none=plan.set_to_none)
        full = px.zero.full_state_dict(model)
        param_diffs = {n: float((full[n] - p).abs().max()) for n, p in ref.model.state_dict().items()}
        out.append({"case": (schedule, opt_name, stage), "grads": grad_diffs, "params": param_diffs})
        dist.barrier()
    return out


def clipping(rank: int, world: int, stages: list[int], norm_types: list[float], steps: int = 3) -> list[dict]:
    """opt.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_: the norms and the parameters after."""
    out = []
    plan = SCHEDULES["always"]
    for stage in stages:
        for norm_type in norm_types:
            max_norm = 0.01 if norm_type == float("inf") else 0.05
            sgd = Optim(torch.optim.SGD, torch.optim.SGD, {"lr": 0.5})
            ref = Reference(world, sgd)
            model, opt = _sharded(stage, plan.bucket_mb, sgd)
            norms, ref_norms = [], []
            for step in range(steps):
                ref.backward(step, plan.gates, 1)
                ref_norms.append(ref.clip(max_norm, norm_type))
                _backward(model, opt, rank, world, step, plan.gates, 1)
                norms.append(float(opt.clip_grad_norm_(max_norm, norm_type)))
                ref.step()
                opt.step()
                opt.zero_grad()
            full = px.zero.full_state_dict(model)
            diff = max(float((full[n] - p).abs().max()) for n, p in ref.model.state_dict().items())
            out.append({"case": (stage, norm_type), "max_norm": max_norm, "norms": norms, "ref_norms": ref_norms,
                        "params": diff})
            dist.barrier()
    return out


def _layerdrop_steps(model, opt, rank: int, world: int, steps: range) -> None:
    plan = SCHEDULES["layerdrop"]
    for step in steps:
        _backward(model, opt, rank, world, step, plan.gates, plan.accum)
        opt.step()
        opt.zero_grad()


def save_layerdrop(rank: int, world: int, stage: int, steps: int, directory: str) -> None:
    """AdamW under LayerDrop for ``steps`` steps (block 1 then has had fewer Adam steps than the
    rest, its bias correction differs), then a checkpoint."""
    model, opt = _sharded(stage, SCHEDULES["layerdrop"].bucket_mb, OPTIMIZERS["adamw"])
    _layerdrop_steps(model, opt, rank, world, range(steps))
    px.checkpoint.save(directory, model, opt, step=steps)


def resume_layerdrop(rank: int, world: int, stage: int, steps: int, directory: str) -> float:
    """Resume that checkpoint (any world size and stage), train ``steps`` more: the largest
    difference from a single-process run of all the steps."""
    model, opt = _sharded(stage, SCHEDULES["layerdrop"].bucket_mb, OPTIMIZERS["adamw"])
    start = px.checkpoint.load(directory, model, opt)["step"]
    _layerdrop_steps(model, opt, rank, world, range(start, start + steps))
    ref = Reference(world, OPTIMIZERS["adamw"])
    for step in range(start + steps):
        ref.backward(step, SCHEDULES["layerdrop"].gates, 1)
        ref.step()
    full = px.zero.full_state_dict(model)
    return max(float((full[n] - p).abs().max()) for n, p in ref.model.state_dict().items())
