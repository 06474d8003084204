"""Rank-side code of the 3D checkpoint tests.

Tensor/pipeline-parallel layers are not used: the model's chosen weights are replaced by their
tensor-parallel slices by hand, and a pipeline stage keeps a subset of the blocks (an
``nn.ModuleDict`` under the full model's names, as ``build_stage`` does), described with
``ParallelState``. The loss ``0.5 * sum(p ** 2)`` over the parameters gives each element the
gradient ``p`` whatever the layout, so AdamW's parameters and moments after a few steps are
known element by element from a single-process torch run (``reference``).
"""

from __future__ import annotations

import torch
from torch import nn

import parallax as px
from parallax.parallel import ParallelDims, ParallelState, attach_parallel_state, init_mesh, parallel_state

VOCAB, WIDTH, HIDDEN, DEPTH = 10, 8, 12, 4
# Tensor-parallel split dimension by parameter name suffix (column-parallel fc, row-parallel
# proj, vocab-parallel tied embedding / head); everything else is replicated.
TP_SPLITS = {"embed.weight": 0, "head.weight": 0, "fc.weight": 0, "fc.bias": 0, "proj.weight": 1}
ALIASES = {"head.weight": "embed.weight"}
ADAMW = dict(lr=0.05, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, hidden)
        self.proj = nn.Linear(hidden, WIDTH)

    def forward(self) -> torch.Tensor:
        return 0.5 * sum(p.pow(2).sum() for p in self.parameters())


class HalfSquares(nn.Module):
    """``forward()`` = 0.5 * the sum of squares of the parameters (blocks via their own forward,
    so ZeRO-3 gathers them)."""

    def forward(self) -> torch.Tensor:
        blocks = self.blocks.values() if isinstance(self.blocks, nn.ModuleDict) else self.blocks
        rest = [p for name, p in self.named_parameters() if not name.startswith("blocks.")]
        return sum(block() for block in blocks) + 0.5 * sum(p.pow(2).sum() for p in rest)


class Net(HalfSquares):
    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(DEPTH))
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        with torch.no_grad():
            for p in self.parameters():
                p.normal_()


class Stage(HalfSquares):
    """Pipeline stage ``pp_rank`` of ``pp``: its blocks under their full-model names, the
    embedding on the first stage, the (tied) head on the last."""

    def __init__(self, net: Net, pp_rank: int, pp: int) -> None:
        super().__init__()
        if pp_rank == 0:
            self.embed = net.embed
        per_stage = DEPTH // pp
        held = range(pp_rank * per_stage, (pp_rank + 1) * per_stage)
        self.blocks = nn.ModuleDict({str(i): net.blocks[i] for i in held})
        if pp_rank == pp - 1:
            self.head = net.head


def _tp_dim(name: str) -> int | None:
    return next((d for suffix, d in TP_SPLITS.items() if name.endswith(suffix)), None)


def build(dims: ParallelDims, stage: int, hidden: int = HIDDEN):
    """The layout's model on this rank (seeded full model, sliced and staged by hand), ZeRO over
    the data-parallel group."""
    mesh = init_mesh(dims)
    torch.manual_seed(0)
    net = Net(hidden)
    model = net if dims.pp == 1 else Stage(net, mesh.pp_rank, dims.pp)
    tp_dims = {}
    for name, p in model.named_parameters():
        dim = _tp_dim(name)
        if dim is not None and dims.tp > 1:
            size = p.shape[dim] // dims.tp
            p.data = p.data.narrow(dim, mesh.tp_rank * size, size).clone()
            tp_dims[name] = dim
    pp_tied = {}
    if dims.pp > 1 and mesh.is_first_stage:
        pp_tied["embed.weight"] = mesh.pp_ranks[-1]
    if dims.pp > 1 and mesh.is_last_stage:
        pp_tied["head.weight"] = mesh.pp_ranks[0]
    attach_parallel_state(model, ParallelState(mesh, tp_dims=tp_dims, pp_tied=pp_tied))
    return _initialize(model, stage, mesh.dp_group)


def build_alone(group, stage: int, hidden: int = HIDDEN):
    """The plain full model (no ``ParallelState``) of one process: ZeRO over a group of one rank."""
    torch.manual_seed(0)
    return _initialize(Net(hidden), stage, group)


def _initialize(model: nn.Module, stage: int, group):
    return px.initialize(model, px.RuntimeConfig(zero_stage=stage, bucket_mb=0.001, timeout_s=60),
                         group=group, optimizer_cls=torch.optim.AdamW, **ADAMW)


def train(model, opt, steps: int) -> None:
    for _ in range(steps):
        opt.backward(model())
        opt.step()
        opt.zero_grad()


def report(model, opt) -> dict:
    """This rank's parameters (whole local copies) and optimizer state pieces, each with its
    place in the full tensor: (name, full shape, dim, start along dim, flat start, flat end)."""
    state = parallel_state(model)
    tp, tp_rank = (state.mesh.dims.tp, state.mesh.tp_rank) if state is not None else (1, 0)
    full = px.zero.full_state_dict(model)

    def place(name: str, shape: torch.Size) -> tuple:
        dim = state.tp_dims.get(name) if state is not None else None
        if dim is None or tp == 1:
            return ALIASES.get(name, name), tuple(shape), None, 0
        full_shape = shape[:dim] + (shape[dim] * tp,) + shape[dim + 1:]
        return ALIASES.get(name, name), tuple(full_shape), dim, tp_rank * shape[dim]

    params = [(place(name, p.shape), full[name]) for name, p in model.named_parameters()]
    pieces = []
    for run in opt.runs:
        seg = run.segment
        local_shape = dict(model.named_parameters())[seg.name].shape
        values = {k: v.detach().clone() for k, v in opt.inner.state[run.param].items()}
        pieces.append((place(seg.name, local_shape), local_shape, seg.start, seg.end, values))
    return {"params": params, "state": pieces}


def save_after(rank: int, world: int, dims: tuple, stage: int, steps: int, directory: str) -> dict:
    model, opt = build(ParallelDims(*dims), stage)
    train(model, opt, steps)
    px.checkpoint.save(directory, model, opt, step=steps)
    return report(model, opt)


def _load_and_step(model, opt, directory: str) -> dict:
    px.checkpoint.load(directory, model, opt)
    loaded = report(model, opt)
    train(model, opt, 1)
    return {"loaded": loaded, "stepped": report(model, opt)}


def load_and_step(rank: int, world: int, layouts: list[tuple[tuple, int]], directory: str) -> list[dict]:
    """For each ((pp, dp, tp), ZeRO stage) in ``layouts`` (one process group each): a fresh model
    loaded at that layout, its state as loaded and one step later."""
    return [_load_and_step(*build(ParallelDims(*dims), stage), directory) for dims, stage in layouts]


def load_and_step_also_alone(rank: int, world: int, layouts: list[tuple[tuple, int]], directory: str) -> dict:
    """``load_and_step``; then each rank alone (a process group of its own, as one process)
    loads the plain model, and a model whose blocks are wider than the checkpoint's (the error)."""
    out = {"layouts": load_and_step(rank, world, layouts, directory)}
    alone = [torch.distributed.new_group([r]) for r in range(world)][rank]  # new_group: every rank, every group
    out["alone"] = _load_and_step(*build_alone(alone, 0), directory)
    try:
        px.checkpoint.load(directory, *build_alone(alone, 0, hidden=HIDDEN + 2))
        out["mismatch"] = "no error"
    except px.checkpoint.CheckpointError as exc:
        out["mismatch"] = str(exc)
    return out


def reference(steps: int) -> dict:
    """Single process, plain torch AdamW: {(kind, name): full tensor} after ``steps`` steps
    (kind 'param' or 'state.KEY')."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    for _ in range(steps):
        model().backward()
        opt.step()
        opt.zero_grad()
    out = {}
    for name, p in model.named_parameters():
        out[("param", name)] = p.detach().clone()
        for key, value in opt.state[p].items():
            out[(f"state.{key}", name)] = value.detach().clone()
    return out
