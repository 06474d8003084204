"""Tensor and pipeline parallelism on gloo ranks: parallax against PyTorch's own, and the pipeline bubble.

The benchmark spawns ``--ranks`` (default 2) local gloo processes, one torch thread each. Every
rank builds the same reference GPT (``parallax.models.GPT``, seed 0) once per provider and
case, and every provider trains it with ``torch.optim.AdamW`` (parallax: ``ZeroOptimizer``
wrapping it, ZeRO stage 0 over the data-parallel group of one rank), so that providers of a case
see the same weights, the same batches and the same arithmetic; ``loss diff`` is the largest
difference of their losses over the steps.

Cases (``--parts``):

* ``tp``: tensor parallelism of degree N = ``--ranks``, one batch for all ranks.
  ``torch``: ``parallelize_module`` with ``ColwiseParallel`` on ``attn.c_attn``, ``mlp.c_fc`` and
  ``lm_head`` (logits stay vocab-sharded, loss under ``loss_parallel``), ``RowwiseParallel`` on
  ``attn.c_proj``, ``mlp.c_proj`` and the tied ``transformer.wte`` (vocab-sharded, tied again
  after), on a ``DeviceMesh`` over gloo. The fused q/k/v rows are reordered so that each
  column shard holds its own heads' q, k and v, and the attention splits them with local head
  counts (what torchtitan's models do). ``parallax``: ``parallax.parallel.tensor.plan.parallelize``.
* ``pp``: pipeline parallelism over N ranks, ``--schedules`` (GPipe, 1F1B, interleaved 1F1B with
  ``--virtual-stages`` chunks per rank) x ``--micro-batches``.
  ``torch``: ``torch.distributed.pipelining.PipelineStage`` per stage holding an equal share of the
  blocks under their original names (the embeddings on the first, the final norm and head on the
  last; rank r holds stages r, r + N, ... when interleaved), ``ScheduleGPipe`` / ``Schedule1F1B`` /
  ``ScheduleInterleaved1F1B`` with the same micro-batch count, the loss
  (``models.loss.lm_loss``, what parallax's last stage computes) as the schedule's ``loss_fn``,
  and the tied embedding's gradients summed across first and last stage after each schedule
  step. ``parallax``: ``build_stage`` with the same block split and ``PipelineSchedule.train_step``.

A step is the whole training step (forward, backward, the optimizer step and zero_grad) on
``--batch`` sequences of ``--seq`` tokens; the k-th step of every provider sees the same batch.
All providers' steps run round-robin in one spawn (``bench.timing.interleave``, an untimed
barrier before each, so drift on the shared machine hits all of them); a step's time is the slower
rank's; ``vs torch`` = parallax's median / torch's median in the same case; ``paired`` = the
median over rounds of parallax's step / torch's step of the same round (adjacent in time, so the
machine's drift cancels; the goal, <= 1.0, is judged on it).

The pipeline bubble is measured in ``--bubble-steps`` extra, instrumented steps per pipeline
provider: every rank records the wall-clock intervals (``time.perf_counter``, CLOCK_MONOTONIC:
one clock for all processes of the machine) in which it computes: the outermost call of any
forward entry point (torch: the stage module and the ``loss_fn`` module; parallax: the stage's
``embed``, ``run_blocks`` and ``head_loss``, which its executor calls per micro-batch; module
forwards nested in them count once) and every ``torch.autograd.backward`` call (the backward of a
micro-batch in both); the hooks exist only in these extra steps, never in the timed ones. The span is
from the first compute start to the last compute end over all ranks; a rank's idle fraction is
1 - (its compute time in the span) / span; ``idle`` is the mean over ranks (median over the
steps), against the formula (p - 1) / (m + p - 1) for p ranks and m micro-batches ((p - 1) /
(v m + p - 1) interleaved with v chunks per rank), which assumes equal stages and free communication.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from parallax.models import GPT, GPTConfig
from parallax.models.gpt import CausalSelfAttention
from parallax.models.loss import lm_loss

from .ranks import spawn_gloo
from .table import Column
from .timing import interleave, quantile

SCHEDULES = ("gpipe", "1f1b", "interleaved")
IMPLEMENTATIONS = ("torch", "parallax")

# model (overrides of the "tiny" GPT preset), batch and steps per run kind.
DEFAULT = dict(n_layer=4, n_embd=128, n_head=4, vocab=2048, seq=64, batch=8, warmup=2, steps=10, bubble_steps=3,
               micro_batches="2,4,8")
QUICK = dict(n_layer=4, n_embd=64, n_head=4, vocab=128, seq=32, batch=4, warmup=1, steps=2, bubble_steps=1,
             micro_batches="2")

COLUMNS = [
    Column("case", "case"),
    Column("provider", "provider"),
    Column("median_ms", "median [ms]", ".1f"),
    Column("p20_ms", "p20 [ms]", ".1f"),
    Column("p80_ms", "p80 [ms]", ".1f"),
    Column("train_ms", "fwd+bwd [ms]", ".1f"),
    Column("update_ms", "opt [ms]", ".1f"),
    Column("vs_torch", "vs torch [x]", ".3f"),
    Column("vs_torch_paired", "paired [x]", ".3f"),
    Column("idle", "idle (measured)", ".3f"),
    Column("bubble_formula", "(p-1)/(m+p-1)", ".3f"),
    Column("max_loss_diff", "loss diff", ".1e"),
]


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--ranks", type=int, default=2,
                        help="gloo ranks = the tensor-parallel degree and the number of pipeline stages (default 2)")
    parser.add_argument("--rank-threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--parts", default="tp,pp", help="comma-separated subset of tp,pp (default both)")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS),
                        help="comma-separated subset of torch,parallax (default both)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES),
                        help=f"comma-separated subset of {','.join(SCHEDULES)} (default all)")
    parser.add_argument("--virtual-stages", dest="virtual_stages", type=int, default=2,
                        help="chunks per rank of the interleaved schedule (default 2)")
    parser.add_argument("--micro-batches", dest="micro_batches", default=None,
                        help=f"comma-separated micro-batch counts (default {DEFAULT['micro_batches']}; "
                             f"--quick: {QUICK['micro_batches']}); each must divide --batch")
    for key, what in (("n_layer", "transformer blocks"), ("n_embd", "model width"), ("n_head", "attention heads"),
                      ("vocab", "vocabulary size"), ("seq", "tokens per sequence"), ("batch", "sequences per step"),
                      ("warmup", "untimed steps per provider"), ("steps", "timed steps per provider"),
                      ("bubble_steps", "instrumented steps per pipeline provider")):
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=None,
                            help=f"{what} (default {DEFAULT[key]}; --quick: {QUICK[key]})")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="collective timeout in seconds (default 60): a rank that dies makes the others fail "
                             "instead of hanging")


# --------------------------------------------------------------------------------------------
# the pipeline bubble


def bubble_formula(stages: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """The idle fraction of every rank in a GPipe or 1F1B schedule over p = ``stages`` equal
    stages with free communication: (p - 1) / (m + p - 1) (the GPipe paper; Narayanan et al.
    2021, section 2.2, as a fraction of the whole step); interleaved 1F1B with v chunks per rank
    shrinks the bubble v times: (p - 1) / (v m + p - 1)."""
    if stages < 1 or micro_batches < 1 or virtual_stages < 1:
        raise ValueError(f"stages, micro_batches and virtual_stages must be >= 1, got {stages}, {micro_batches} "
                         f"and {virtual_stages}")
    return (stages - 1) / (virtual_stages * micro_batches + stages - 1)


def busy_seconds(intervals: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of ``intervals`` (start, end) clipped to [start, end]."""
    total, covered_to = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, covered_to), min(b, end)
        if b > a:
            total += b - a
            covered_to = b
    return total


def idle_fractions(per_rank: Sequence[Sequence[tuple[float, float]]]) -> list[float]:
    """Each rank's idle fraction of the pipeline's span (first compute start to last compute end
    over all ranks), from the compute intervals of every rank on one clock."""
    starts = [a for intervals in per_rank for a, _ in intervals]
    ends = [b for intervals in per_rank for _, b in intervals]
    if not starts:
        raise ValueError("no compute intervals recorded")
    start, end = min(starts), max(ends)
    return [1.0 - busy_seconds(intervals, start, end) / (end - start) for intervals in per_rank]


class ComputeRecorder:
    """Records the intervals in which this rank computes, while ``recording()`` is active.

    A forward is the outermost call of any module given to ``attach`` or of any method given
    to ``attach_methods`` (so nested calls count once); a backward is a ``torch.autograd.backward``
    call (``Tensor.backward`` goes through it), replaced for the duration of ``recording()``.
    ``detach`` removes the hooks and method wrappers, so that timed steps run without them.
    """

    def __init__(self) -> None:
        self.intervals: list[tuple[float, float]] = []
        self._depth = 0
        self._started = 0.0
        self._handles: list = []
        self._wrapped: list[tuple[object, str]] = []

    def attach(self, modules: Sequence[nn.Module]) -> None:
        """Record the forward of each of ``modules``."""
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave))

    def attach_methods(self, obj: object, names: Sequence[str]) -> None:
        """Record each call of the methods ``names`` of ``obj`` (instance attributes shadow them
        until ``detach``): compute entry points that are not module calls."""
        for name in names:
            method = getattr(obj, name)

            def timed(*args, _method=method, **kwargs):
                self._enter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self._leave()

            setattr(obj, name, timed)
            self._wrapped.append((obj, name))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for obj, name in self._wrapped:
            delattr(obj, name)
        self._handles, self._wrapped = [], []

    def _enter(self, *_) -> None:
        if self._depth == 0:
            self._started = time.perf_counter()
        self._depth += 1

    def _leave(self, *_) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.intervals.append((self._started, time.perf_counter()))

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[float, float]]]:
        original = torch.autograd.backward

        def timed_backward(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.intervals.append((t0, time.perf_counter()))

        self.intervals = []
        torch.autograd.backward = timed_backward
        try:
            yield self.intervals
        finally:
            torch.autograd.backward = original


# --------------------------------------------------------------------------------------------
# rank side: providers


@dataclass
class _Provider:
    """One implementation of one case on this rank: ``train(k)`` runs forward and backward of batch
    k (gradients complete, the pipeline's tied gradients summed) and returns the loss (0.0 on a
    rank without it); ``update()`` steps the optimizer and zeroes the gradients."""

    case: str
    implementation: str
    train: Callable[[int], float]
    update: Callable[[], None]
    # pipeline only: what ComputeRecorder records as forward compute (modules; object -> method names)
    compute_modules: list[nn.Module] = field(default_factory=list)
    compute_methods: list[tuple[object, tuple[str, ...]]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    phases: list[tuple[float, float]] = field(default_factory=list)  # (train, update) seconds per step

    @property
    def name(self) -> str:
        return f"{self.implementation} {self.case}"

    def step(self) -> None:
        """One training step on the next batch (0, 1, 2, ...)."""
        t0 = time.perf_counter()
        self.losses.append(self.train(len(self.losses)))
        t1 = time.perf_counter()
        self.update()
        self.phases.append((t1 - t0, time.perf_counter() - t1))


def _batch(k: int, args: dict):
    """The k-th batch (same on every rank): idx, targets (B, T) int64."""
    g = torch.Generator().manual_seed(1_000 + k)
    idx = torch.randint(0, args["vocab"], (args["batch"], args["seq"] + 1), generator=g)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def _model(config: GPTConfig, state: dict) -> GPT:
    model = GPT(config)
    model.load_state_dict(state)
    return model


def _torch_update(opt: torch.optim.Optimizer) -> Callable[[], None]:
    def update() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return update


def _parallax_update(opt) -> Callable[[], None]:
    def update() -> None:
        opt.step()
        opt.zero_grad()

    return update


# -- tensor parallelism: torch


class LocalHeadsAttention(CausalSelfAttention):
    """parallax's attention computing with this rank's heads only: under torch's column-parallel
    ``c_attn`` it gets (B, T, local q + k + v), not the full widths."""

    def forward(self, x: torch.Tensor, segments=None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C) partial sums (the row-parallel ``c_proj`` all-reduces them)."""
        B, T, _ = x.size()
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([q_dim, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        y = self.attend(q, k, v, segments).reshape(B, T, q_dim)
        return self.resid_dropout(self.c_proj(y))


def _shard_heads_contiguously(attn, tp: int) -> None:
    """Reorder the fused q/k/v rows of ``attn.c_attn`` to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (rank r's
    heads), so that a contiguous split of the rows in ``tp`` gives each rank its own q, k and v;
    set the local head counts."""
    q_dim, kv_dim = attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim
    with torch.no_grad():
        for p in (attn.c_attn.weight, attn.c_attn.bias):
            if p is None:
                continue
            q, k, v = p.split([q_dim, kv_dim, kv_dim], dim=0)
            p.copy_(torch.cat([torch.cat(parts) for parts in zip(q.chunk(tp), k.chunk(tp), v.chunk(tp))]))
    attn.n_head //= tp
    attn.n_kv_head //= tp
    attn.attend.n_head, attn.attend.n_kv_head = attn.n_head, attn.n_kv_head
    attn.__class__ = LocalHeadsAttention


def _torch_tp(config, state, args, world: int) -> _Provider:
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

    model = _model(config, state)
    mesh = init_device_mesh("cpu", (world,))
    plan = {"transformer.wte": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for i, block in enumerate(model.transformer.h):
        _shard_heads_contiguously(block.attn, world)
        plan.update({f"transformer.h.{i}.attn.c_attn": ColwiseParallel(),
                     f"transformer.h.{i}.attn.c_proj": RowwiseParallel(),
                     f"transformer.h.{i}.mlp.c_fc": ColwiseParallel(),
                     f"transformer.h.{i}.mlp.c_proj": RowwiseParallel()})
    parallelize_module(model, mesh, plan)
    # Both plans shard the tied matrix by vocabulary rows (Shard(0)); distributing each module
    # replaced its own parameter, so tie them again.
    model.lm_head.weight = model.transformer.wte.weight
    opt = torch.optim.AdamW(model.parameters(), lr=args["lr"], weight_decay=args["weight_decay"])

    def train(k: int) -> float:
        idx, targets = _batch(k, args)
        h = model.hidden_states(idx)
        logits = model.lm_head(h)  # DTensor (B, T, V) sharded over the vocabulary
        with loss_parallel():
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
        return float(loss.detach().full_tensor())

    return _Provider("tp", "torch", train, _torch_update(opt))


# -- tensor parallelism: parallax


def _parallax_tp(config, state, args, world: int) -> _Provider:
    import parallax as px
    from parallax.parallel.mesh import ParallelDims, init_mesh
    from parallax.parallel.tensor.plan import parallelize

    mesh = init_mesh(ParallelDims(tp=world))
    model = parallelize(_model(config, state), mesh)
    model, opt = px.initialize(model, px.RuntimeConfig(zero_stage=0, timeout_s=args["timeout"]),
                               optimizer_cls=torch.optim.AdamW, group=mesh.dp_group, lr=args["lr"],
                               weight_decay=args["weight_decay"])

    def train(k: int) -> float:
        idx, targets = _batch(k, args)
        loss = model(idx, targets)
        opt.backward(loss)
        return float(loss.detach())

    return _Provider("tp", "parallax", train, _parallax_update(opt))


# -- pipeline parallelism: torch


def _stage_blocks(n_layer: int, stages: int, stage: int) -> range:
    """The blocks of pipeline stage ``stage`` of ``stages`` equal ones."""
    per = n_layer // stages
    return range(stage * per, (stage + 1) * per)


def _virtual_stages(schedule: str, args: dict) -> int:
    return args["virtual_stages"] if schedule == "interleaved" else 1


class TorchStage(nn.Module):
    """One rank's part of the GPT for ``torch.distributed.pipelining``, under the original names:
    (first stage) the embeddings, the blocks of ``blocks`` (a ModuleDict keyed by block index),
    (last stage) the final norm and the head (whose loss the schedule's ``loss_fn`` computes)."""

    def __init__(self, model: nn.Module, blocks: range, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        parts = {"h": nn.ModuleDict({str(i): model.transformer.h[i] for i in blocks})}
        if first:
            parts.update(wte=model.transformer.wte, wpe=model.transformer.wpe, drop=model.transformer.drop)
        if last:
            parts.update(ln_f=model.transformer.ln_f)
            self.lm_head = model.lm_head
        self.transformer = nn.ModuleDict(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(first stage) idx (b, T) int64, else h (b, T, C) -> h (b, T, C) (last: after the final norm)."""
        t = self.transformer
        if self.first:
            positions = torch.arange(x.size(1), device=x.device)
            x = t.drop(t.wte(x) + t.wpe(positions))
        for block in t.h.values():
            x = block(x)
        return t.ln_f(x) if self.last else x


class HeadLoss(nn.Module):
    """The last stage's loss as a module (so that its forward is recorded as compute): the mean
    cross-entropy of ``head`` applied to h, by ``models.loss.lm_loss`` as parallax's GPT."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """h (b, T, C), targets (b, T) -> scalar fp32 loss."""
        return lm_loss(h, self.head.weight, targets)


def _torch_pp(config, state, args, world: int, rank: int, schedule: str, micro_batches: int) -> _Provider:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    first, last = rank == 0, rank == world - 1
    model = _model(config, state)
    chunks = _virtual_stages(schedule, args)
    n_stages = world * chunks
    # rank r holds stages r, r + world, ... (interleaved), as parallax's stage_layout
    submods = [TorchStage(model, _stage_blocks(config.n_layer, n_stages, s), s == 0, s == n_stages - 1)
               for s in range(rank, n_stages, world)]
    stages = [PipelineStage(m, stage_index=s, num_stages=n_stages, device=torch.device("cpu"))
              for m, s in zip(submods, range(rank, n_stages, world))]
    # Every rank's schedule needs a loss_fn to run backward at all; only the last stage calls it.
    loss_fn = HeadLoss(model.lm_head)
    if schedule == "interleaved":
        runner = ScheduleInterleaved1F1B(stages, n_microbatches=micro_batches, loss_fn=loss_fn)
    else:
        runner = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule](stages[0], n_microbatches=micro_batches,
                                                                           loss_fn=loss_fn)
    params = [p for m in submods for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args["lr"], weight_decay=args["weight_decay"])
    tied = submods[0].transformer.wte.weight if first else submods[-1].lm_head.weight if last else None

    def train(k: int) -> float:
        idx, targets = _batch(k, args)
        losses: list = []
        if first:
            runner.step(idx)
        elif last:
            runner.step(target=targets, losses=losses)
        else:
            runner.step()
        if world > 1:  # the embedding is tied to the head: each copy gets the sum of both stages' gradients
            grad = tied.grad if tied is not None else torch.zeros(config.vocab_size, config.n_embd)
            dist.all_reduce(grad)
        return float(torch.stack(losses).detach().mean()) if losses else 0.0

    return _Provider(f"pp-{schedule}-m{micro_batches}", "torch", train, _torch_update(opt), [*submods, loss_fn])


# -- pipeline parallelism: parallax


def _parallax_pp(config, state, args, world: int, schedule: str, micro_batches: int) -> _Provider:
    import parallax as px
    from parallax.parallel.mesh import ParallelDims, init_mesh
    from parallax.parallel.pipeline.executor import PipelineSchedule
    from parallax.parallel.pipeline.split import build_stage

    mesh = init_mesh(ParallelDims(pp=world))
    # equal costs per block: the same split as the torch stages
    stage = build_stage(_model(config, state), mesh, virtual_stages=_virtual_stages(schedule, args),
                        balance=[1.0] * config.n_layer)
    stage, opt = px.initialize(stage, px.RuntimeConfig(zero_stage=0, timeout_s=args["timeout"]),
                               optimizer_cls=torch.optim.AdamW, group=mesh.dp_group, lr=args["lr"],
                               weight_decay=args["weight_decay"])
    runner = PipelineSchedule(stage, opt, mesh, schedule=schedule, micro_batches=micro_batches)

    def train(k: int) -> float:
        idx, targets = _batch(k, args)
        return float(runner.train_step(idx, targets))

    # The executor calls these stage methods per micro-batch (the loss is computed in head_loss,
    # outside any module call); module forwards inside them count once.
    entry_points = ("embed", "run_blocks", "head_loss")
    missing = [n for n in entry_points if not callable(getattr(stage, n, None))]
    if missing:  # the bubble would count the missing compute as idle
        raise RuntimeError(f"bench parallel records parallax's pipeline compute at the stage methods {entry_points}, "
                           f"but the stage has no {missing}: update bench/parallel.py to the executor's entry points")
    return _Provider(f"pp-{schedule}-m{micro_batches}", "parallax", train, _parallax_update(opt), [stage],
                     [(stage, entry_points)])


def _build_providers(config, state, args: dict, rank: int, world: int) -> tuple[list[_Provider], dict[str, str]]:
    """Every provider of every case, in a fixed order on all ranks (building one may run
    collectives); an implementation that fails to build is left out with the reason."""
    builders: list[tuple[str, str, Callable[[], _Provider]]] = []
    if "tp" in args["parts"]:
        builders.append(("tp", "torch", lambda: _torch_tp(config, state, args, world)))
        builders.append(("tp", "parallax", lambda: _parallax_tp(config, state, args, world)))
    if "pp" in args["parts"]:
        for schedule in args["schedules"]:
            for m in args["micro_batches"]:
                case = f"pp-{schedule}-m{m}"
                builders.append((case, "torch", lambda s=schedule, m=m: _torch_pp(config, state, args, world, rank,
                                                                                  s, m)))
                builders.append((case, "parallax", lambda s=schedule, m=m: _parallax_pp(config, state, args, world,
                                                                                        s, m)))
    providers, failed = [], {}
    for case, implementation, build in builders:
        if implementation not in args["implementations"]:
            continue
        try:
            providers.append(build())
        except (ImportError, NotImplementedError) as exc:  # the parallax side is not there (yet)
            failed[f"{implementation} {case}"] = f"{type(exc).__name__}: {exc}"
    return providers, failed


def _rank_main(rank: int, world: int, args: dict) -> dict:
    import torch.distributed as dist

    config = GPTConfig.from_preset("tiny", n_layer=args["n_layer"], n_embd=args["n_embd"], n_head=args["n_head"],
                                   vocab_size=args["vocab"], block_size=args["seq"])
    torch.manual_seed(0)
    state = GPT(config).state_dict()
    providers, failed = _build_providers(config, state, args, rank, world)

    timings = interleave({p.name: p.step for p in providers}, warmup=args["warmup"], repeat=args["steps"],
                         flush=dist.barrier)
    timed = slice(args["warmup"], args["warmup"] + args["steps"])
    phases = {p.name: p.phases[timed] for p in providers}

    compute: dict[str, list[list[tuple[float, float]]]] = {}
    recorder = ComputeRecorder()
    for p in providers:
        if not (p.compute_modules or p.compute_methods):
            continue
        recorder.attach([m for top in p.compute_modules for m in top.modules()])
        for obj, names in p.compute_methods:
            recorder.attach_methods(obj, names)
        compute[p.name] = []
        for _ in range(args["bubble_steps"]):
            dist.barrier()
            with recorder.recording() as intervals:
                p.step()
            compute[p.name].append(list(intervals))
        recorder.detach()
    return {"rank": rank, "config": config.to_dict(), "params": GPT(config).num_params(non_embedding=False),
            "failed": failed, "times": {name: list(t.times_s) for name, t in timings.items()}, "phases": phases,
            "losses": {p.name: p.losses for p in providers}, "compute": compute}


# --------------------------------------------------------------------------------------------
# parent side


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what}: expected positive integers, got {text!r}")
    return values


def _subset(text: str, allowed: Sequence[str], what: str) -> list[str]:
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        raise ValueError(f"{what}: unknown {unknown or chosen}; allowed: {', '.join(allowed)}")
    return [v for v in allowed if v in chosen]


def _settings(ctx) -> dict:
    a = ctx.args
    base = QUICK if ctx.quick else DEFAULT
    s = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in base.items()}
    s["micro_batches"] = _int_list(s["micro_batches"], "--micro-batches")
    if a.ranks < 2 or a.rank_threads < 1:
        raise ValueError(f"--ranks must be >= 2 and --rank-threads >= 1, got {a.ranks} and {a.rank_threads}")
    if s["n_layer"] % a.ranks or s["n_head"] % a.ranks or s["vocab"] % a.ranks:
        raise ValueError(f"--ranks {a.ranks} must divide --n-layer {s['n_layer']}, --n-head {s['n_head']} and "
                         f"--vocab {s['vocab']}")
    bad = [m for m in s["micro_batches"] if s["batch"] % m or m % a.ranks]
    if bad:
        raise ValueError(f"--micro-batches {bad}: each must divide --batch {s['batch']} and be a multiple of --ranks "
                         f"{a.ranks} (1F1B needs a micro-batch per stage, interleaved 1F1B whole rounds of them)")
    schedules = _subset(a.schedules, SCHEDULES, "--schedules")
    if "interleaved" in schedules and (a.virtual_stages < 2 or s["n_layer"] % (a.ranks * a.virtual_stages)):
        raise ValueError(f"--virtual-stages {a.virtual_stages}: must be >= 2 and --ranks x --virtual-stages must "
                         f"divide --n-layer {s['n_layer']} (interleaved schedule)")
    return dict(s, parts=_subset(a.parts, ("tp", "pp"), "--parts"),
                implementations=_subset(a.implementations, IMPLEMENTATIONS, "--implementations"),
                schedules=schedules, virtual_stages=a.virtual_stages, rank_threads=a.rank_threads,
                timeout=a.timeout, lr=1e-3, weight_decay=0.1)


def run(ctx) -> Iterator[dict]:
    args = _settings(ctx)
    world = ctx.args.ranks
    if ctx.device.type != "cpu":
        ctx.log(f"this benchmark runs on {world} CPU gloo ranks; --device {ctx.device.type} is ignored")
    n_pp = len(args["schedules"]) * len(args["micro_batches"]) if "pp" in args["parts"] else 0
    n_cases = ("tp" in args["parts"]) + n_pp
    ctx.log(f"spawning {world} gloo ranks x {args['rank_threads']} thread(s): GPT n_layer={args['n_layer']} "
            f"n_embd={args['n_embd']} vocab={args['vocab']}, {args['batch']}x{args['seq']} tokens per step, "
            f"{n_cases} case(s) x {', '.join(args['implementations'])}, {args['warmup']} + {args['steps']} steps each")
    steps = (args["warmup"] + args["steps"]) * n_cases * 2 + args["bubble_steps"] * n_pp * 2
    results = spawn_gloo(_rank_main, world, args, deadline_s=120 + args["timeout"] + 10 * steps)

    for what, reason in results[0]["failed"].items():
        ctx.skip(what, reason)
    ctx.note("method", f"{world} gloo ranks x {args['rank_threads']} thread(s); every provider's steps interleaved "
                       "round-robin with an untimed barrier before each; step time = the slower rank's; "
                       "optimizer torch.optim.AdamW (parallax: ZeroOptimizer over it, ZeRO stage 0)")
    ctx.note("bubble", f"idle = mean over ranks of 1 - compute time / pipeline span (first compute start to last "
                       f"compute end), median of {args['bubble_steps']} instrumented step(s); compute = forwards (torch: "
                       "the stage module and the loss_fn; parallax: the stage's embed/run_blocks/head_loss) and "
                       "torch.autograd.backward calls; formula (p-1)/(m+p-1), interleaved (p-1)/(v m+p-1)")
    rows = list(_rows(results, args, world))
    _note_goals(ctx, rows)
    yield from rows


def _rows(results: list[dict], args: dict, world: int) -> Iterator[dict]:
    names = list(results[0]["times"])
    by_case: dict[str, dict[str, dict]] = {}
    for name in names:
        implementation, case = name.split(" ", 1)
        per_step = [max(r["times"][name][i] for r in results) for i in range(args["steps"])]
        losses = results[-1]["losses"][name]  # the last stage holds the pipeline's loss
        row = {
            "case": case, "provider": implementation, "parallel": case.split("-")[0], "degree": world,
            "schedule": case.split("-")[1] if case.startswith("pp") else None,
            "micro_batches": int(case.rsplit("m", 1)[1]) if case.startswith("pp") else None,
            "params": results[0]["params"], "model": results[0]["config"], "batch": f"{args['batch']}x{args['seq']}",
            "steps": args["steps"], "median_ms": 1e3 * quantile(per_step, 0.5),
            "p20_ms": 1e3 * quantile(per_step, 0.2), "p80_ms": 1e3 * quantile(per_step, 0.8),
            "step_ms": [1e3 * t for t in per_step], "losses": losses,
        }
        for j, phase in enumerate(("train_ms", "update_ms")):  # the slower rank's, per step
            row[phase] = 1e3 * quantile([max(r["phases"][name][i][j] for r in results)
                                         for i in range(args["steps"])], 0.5)
        if name in results[0]["compute"]:
            steps = [idle_fractions([r["compute"][name][i] for r in results]) for i in range(args["bubble_steps"])]
            row["idle_per_rank"] = [quantile([s[r] for s in steps], 0.5) for r in range(world)]
            row["idle"] = quantile([sum(s) / world for s in steps], 0.5)
            row["virtual_stages"] = _virtual_stages(row["schedule"], args)
            row["bubble_formula"] = bubble_formula(world, row["micro_batches"], row["virtual_stages"])
            row["timeline_ms"] = _relative_timeline([r["compute"][name][0] for r in results])
        by_case.setdefault(case, {})[implementation] = row
    for rows in by_case.values():
        torch_row = rows.get("torch")
        for row in rows.values():
            row["vs_torch"] = row["median_ms"] / torch_row["median_ms"] if torch_row else None
            # the same round's steps ran back to back: their ratio cancels most of the machine's drift
            row["vs_torch_paired"] = (quantile([a / b for a, b in zip(row["step_ms"], torch_row["step_ms"])], 0.5)
                                      if torch_row else None)
            other = rows.get("parallax" if row["provider"] == "torch" else "torch")
            row["max_loss_diff"] = (max(abs(a - b) for a, b in zip(row["losses"], other["losses"]))
                                    if other else None)
        yield from rows.values()


def _relative_timeline(per_rank: list[list[tuple[float, float]]]) -> list[list[list[float]]]:
    """Per rank the compute intervals [start, end] in ms from the pipeline's first compute start."""
    origin = min(a for intervals in per_rank for a, _ in intervals)
    return [[[1e3 * (a - origin), 1e3 * (b - origin)] for a, b in sorted(intervals)] for intervals in per_rank]


def plot(rows: list[dict], path) -> None:
    """Left: measured idle fraction against m for each schedule and implementation, with the
    formula; right: the compute timeline of each rank in one step of the largest m."""
    from .runner import pyplot

    plt = pyplot()
    pp_rows = [r for r in rows if r.get("idle") is not None]
    if not pp_rows:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for schedule in SCHEDULES:
        for implementation, style in (("torch", "--"), ("parallax", "-")):
            sel = sorted((r["micro_batches"], r["idle"]) for r in pp_rows
                         if r["schedule"] == schedule and r["provider"] == implementation)
            if sel:
                left.plot(*zip(*sel), style, marker="o", label=f"{implementation} {schedule}")
    ms = sorted({r["micro_batches"] for r in pp_rows})
    for v in sorted({r["virtual_stages"] for r in pp_rows}):
        left.plot(ms, [bubble_formula(pp_rows[0]["degree"], m, v) for m in ms], "k:" if v == 1 else "k-.",
                  marker="x", label="(p-1)/(m+p-1)" if v == 1 else f"(p-1)/({v}m+p-1)")
    left.set(xlabel="micro-batches m", ylabel="idle fraction", xticks=ms, ylim=(0, 1))
    left.legend()
    largest = [r for r in pp_rows if r["micro_batches"] == ms[-1]]
    for k, row in enumerate(largest):
        for rank, intervals in enumerate(row["timeline_ms"]):
            y = k * (row["degree"] + 1) + rank
            right.broken_barh([(a, b - a) for a, b in intervals], (y, 0.8))
    right.set_yticks([k * (r["degree"] + 1) + rank + 0.4 for k, r in enumerate(largest) for rank in range(r["degree"])],
                     [f"{r['provider']} {r['schedule']} rank {rank}" for r in largest for rank in range(r["degree"])])
    right.set(xlabel=f"ms (one step, m={ms[-1]})", title="compute per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _note_goals(ctx, rows: list[dict]) -> None:
    goals = {}
    for row in rows:
        if row["provider"] == "parallax" and row["vs_torch"] is not None:
            x = row["vs_torch_paired"]
            goals[f"{row['case']}: parallax step <= 1.0x torch"] = f"{x:.3f}x, {'met' if x <= 1.0 else 'NOT met'}"
    if goals:
        ctx.note("goals", goals)
