"""ZeRO data parallelism: parallax stages 0-3 against torch DDP and FSDP2 on 2 gloo ranks.

The benchmark spawns ``--ranks`` local processes (gloo, one thread each by default: this machine
has 2 cores). Each rank builds every provider on the same reference GPT with the same initial
weights (seed 0):

* ``ddp``: ``DistributedDataParallel(gradient_as_bucket_view=True)`` + ``torch.optim.AdamW(fused=True)``;
* ``fsdp2``: ``fully_shard`` on each transformer block, then on the root, + ``torch.optim.AdamW(fused=True)``
  (on the DTensor shards);
* ``fsdp2-p1``: the same with FSDP2's explicit prefetching of one block ahead in forward and
  backward (``set_modules_to_forward_prefetch`` / ``set_modules_to_backward_prefetch``), what
  parallax's default ``prefetch=1`` does; without it FSDP2 on CPU gathers each block on demand;
* ``parallax-S``: ``px.initialize(model, RuntimeConfig(zero_stage=S, bucket_mb, prefetch))`` with
  ``px.optim.AdamW`` (``--parallax-optimizer torch-fused`` wraps ``torch.optim.AdamW(fused=True)``
  instead, so that every provider runs the same optimizer arithmetic).

A step is forward + backward + optimizer step + zero_grad on this rank's batch (``--batch`` x
``--seq`` tokens; the k-th step of every provider sees the same batch). Steps are timed
round-robin, one step of each provider in turn (``bench.timing.interleave``), with an untimed
barrier before each so both ranks start it together; a step's time is the slower rank's.

Memory is the *model states* a rank holds (parameters + gradients + optimizer state, each
storage counted once), sampled in one extra untimed step: at each transformer block's forward
and backward boundary, after backward and after the optimizer step. ``states`` is the larger of
the after-backward and after-step samples (the ZeRO paper's model states); ``peak`` is the
largest sample anywhere in the step, including what exists only transiently (a gathered stage-3
unit, full-size gradient buckets before their reduce-scatter, FSDP2's unsharded parameters and
gradients). Communication buffers (all-gather/reduce-scatter staging) are not model states and
are not counted. parallax is measured with ``px.zero.memory_report``; DDP and FSDP2 by walking
their tensors: parameters (FSDP2: local shards and any unsharded parameters alive), gradients
(DDP: its bucket storages, which ``p.grad`` views), optimizer state (``step`` excluded).

The formula is the ZeRO paper's, for fp32 training with Adam on Psi parameters and N ranks:
parameters 4 Psi (stage 3: 4 Psi/N) + gradients 4 Psi (stages 2-3: 4 Psi/N) + Adam m, v 8 Psi
(stages 1-3: 8 Psi/N); DDP is stage 0, FSDP2 stage 3.

``max diff`` is the largest absolute difference of each provider's full parameters from DDP's
after all the steps (``px.zero.full_state_dict``; FSDP2 ``full_tensor()``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .ranks import spawn_gloo
from .table import Column

PARALLAX_STAGES = (0, 1, 2, 3)
# parallax-3-p0: stage 3 without prefetch, the memory/time trade-off next to FSDP2 (which does
# not prefetch on CPU): prefetching one unit hides its gather but holds it while the current runs.
PROVIDERS = ("ddp", "fsdp2", "fsdp2-p1") + tuple(f"parallax-{s}" for s in PARALLAX_STAGES) + ("parallax-3-p0",)
FORMULA_STAGE = {"ddp": 0, "fsdp2": 3, "fsdp2-p1": 3, "parallax-3-p0": 3,
                 **{f"parallax-{s}": s for s in PARALLAX_STAGES}}
MB = 2**20

# model: overrides of the "tiny" GPT preset; batch and steps per run kind.
DEFAULT = dict(n_layer=4, n_embd=256, n_head=4, seq=128, batch=8, warmup=2, steps=20)
QUICK = dict(n_layer=2, n_embd=64, n_head=4, seq=32, batch=2, warmup=1, steps=4)

COLUMNS = [
    Column("provider", "provider"),
    Column("median_ms", "median [ms]", ".1f"),
    Column("p20_ms", "p20 [ms]", ".1f"),
    Column("p80_ms", "p80 [ms]", ".1f"),
    Column("fwd_ms", "fwd [ms]", ".1f"),
    Column("bwd_ms", "bwd [ms]", ".1f"),
    Column("opt_ms", "opt+zero [ms]", ".1f"),
    Column("vs_ddp", "vs ddp [x]", ".3f"),
    Column("vs_fsdp2", "vs fsdp2 [x]", ".3f"),
    Column("states_mb", "states [MB]", ".2f"),
    Column("formula_mb", "formula [MB]", ".2f"),
    Column("vs_formula", "/formula [x]", ".3f"),
    Column("peak_mb", "peak [MB]", ".2f"),
    Column("peak_at", "peak at"),
    Column("max_diff", "max diff", ".1e"),
]


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--ranks", type=int, default=2, help="local gloo ranks to spawn (default 2)")
    parser.add_argument("--rank-threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)}")
    for key, what in (("n_layer", "transformer blocks"), ("n_embd", "model width"), ("n_head", "attention heads"),
                      ("seq", "tokens per sequence"), ("batch", "sequences per rank and step"),
                      ("warmup", "untimed steps per provider"), ("steps", "timed steps per provider")):
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=None,
                            help=f"{what} (default {DEFAULT[key]}; --quick: {QUICK[key]})")
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="parallax bucket_mb (default 25, as DDP's)")
    parser.add_argument("--prefetch", type=int, default=1, help="parallax stage-3 prefetch (default 1)")
    parser.add_argument("--parallax-optimizer", choices=("parallax", "torch-fused"), default="parallax",
                        help="what ZeroOptimizer wraps: px.optim.AdamW (default) or torch.optim.AdamW(fused=True)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="collective timeout in seconds (gloo and parallax; default 60): a rank that dies makes "
                             "the others fail instead of hanging")


# --------------------------------------------------------------------------------------------
# the ZeRO paper's model-state formula


def formula_bytes(stage: int, psi: int, world: int) -> dict[str, float]:
    """Model-state bytes per rank for fp32 training with Adam (ZeRO paper, K = 8 for m and v)."""
    params = 4 * psi / (world if stage >= 3 else 1)
    grads = 4 * psi / (world if stage >= 2 else 1)
    optim = 8 * psi / (world if stage >= 1 else 1)
    return {"param": params, "grad": grads, "optim": optim, "total": params + grads + optim}


def mixed_precision_formula(stage: int, psi: int, world: int) -> float:
    """The paper's mixed-precision figure (bf16/fp16 params 2 + grads 2 + K = 12 fp32 states) = 16 Psi at stage 0."""
    return (2 * psi / (world if stage >= 3 else 1) + 2 * psi / (world if stage >= 2 else 1)
            + 12 * psi / (world if stage >= 1 else 1))


# --------------------------------------------------------------------------------------------
# rank side


def _storage_key(t):
    """(data_ptr, nbytes) of the storage behind ``t`` (a DTensor's local shard); None when freed."""
    local = getattr(t, "_local_tensor", t)
    storage = local.untyped_storage()
    n = storage.nbytes()
    return (storage.data_ptr(), n) if n else None


def _sum_unique(groups: dict[str, list]) -> dict[str, int]:
    """Bytes per category, each storage counted once (in the first category that names it)."""
    seen: set[int] = set()
    out = {}
    for name, tensors in groups.items():
        total = 0
        for t in tensors:
            if t is None:
                continue
            key = _storage_key(t)
            if key is not None and key[0] not in seen:
                seen.add(key[0])
                total += key[1]
        out[name] = total
    return out


def _optimizer_tensors(opt) -> list:
    return [v for state in opt.state.values() for k, v in state.items()
            if k != "step" and hasattr(v, "untyped_storage")]


@dataclass
class _Provider:
    name: str
    model: object  # what the step calls
    blocks: list  # the transformer blocks (for memory sampling)
    backward: Callable
    step_opt: Callable
    zero_grad: Callable
    model_states: Callable[[], dict[str, int]]  # {"param", "grad", "optim"} bytes now
    full_params: Callable[[], dict]  # name -> full fp32 CPU tensor (collective: every rank calls it)
    phases: list = field(default_factory=list)  # per call: (fwd, bwd, opt + zero_grad) seconds
    calls: int = 0


def _build_ddp(base, state, lr, wd):
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    module = base()
    module.load_state_dict(state)
    ddp = DDP(module, gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=wd, fused=True)

    def model_states():
        # DDP's buckets exist from construction on; with gradient_as_bucket_view each p.grad
        # becomes a view into one of them after its first reduction. A grad that is not a view
        # (autograd's fresh allocation before DDP copies it into the bucket) is extra memory.
        sizes = str(ddp._get_ddp_logging_data().get("bucket_sizes", ""))
        buckets = sum(int(x) for x in sizes.replace(",", " ").split())
        loose = [p.grad for p in module.parameters() if p.grad is not None and p.grad._base is None]
        states = _sum_unique({"param": list(module.parameters()), "grad": loose, "optim": _optimizer_tensors(opt)})
        states["grad"] += buckets
        return states

    def full_params():
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    return _Provider("ddp", ddp, list(module.transformer.h), lambda loss: loss.backward(), opt.step,
                     lambda: opt.zero_grad(set_to_none=True), model_states, full_params)


def _build_fsdp2(base, state, lr, wd, prefetch: bool = False):
    import torch
    from torch.distributed.fsdp import fully_shard

    module = base()
    module.load_state_dict(state)
    blocks = list(module.transformer.h)
    for block in blocks:
        fully_shard(block)
    fully_shard(module)
    if prefetch:
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1: i + 2])
            block.set_modules_to_backward_prefetch(blocks[max(0, i - 1): i])
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=wd, fused=True)
    fsdp_params = []
    for m in module.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        group = get_state()._fsdp_param_group if get_state is not None else None
        if group is not None:
            fsdp_params.extend(group.fsdp_params)

    def model_states():
        params, grads = [], []
        for fp in fsdp_params:
            params.append(fp._sharded_param_data)
            params.extend(getattr(fp, "all_gather_outputs", None) or [])
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None:
                params.append(unsharded)
                grads.append(unsharded.grad)
            grads.append(fp.sharded_param.grad)
            grads.append(getattr(fp, "unsharded_accumulated_grad", None))
        return _sum_unique({"param": params, "grad": grads, "optim": _optimizer_tensors(opt)})

    def full_params():
        return {n: p.full_tensor().detach().clone() for n, p in module.named_parameters()}

    return _Provider("fsdp2-p1" if prefetch else "fsdp2", module, blocks, lambda loss: loss.backward(), opt.step,
                     lambda: opt.zero_grad(set_to_none=True), model_states, full_params)


def _build_parallax(stage, base, state, lr, wd, args, name=None):
    import torch

    import parallax as px

    module = base()
    module.load_state_dict(state)
    cls = px.optim.AdamW
    kwargs = dict(lr=lr, weight_decay=wd)
    if args["parallax_optimizer"] == "torch-fused":
        cls, kwargs = torch.optim.AdamW, dict(kwargs, fused=True)
    config = px.RuntimeConfig(zero_stage=stage, bucket_mb=args["bucket_mb"], prefetch=args["prefetch"],
                              timeout_s=args["timeout"])
    model, opt = px.initialize(module, config, optimizer_cls=cls, **kwargs)

    def model_states():
        r = px.zero.memory_report(model, opt)
        return {"param": r["param_bytes"], "grad": r["grad_bytes"], "optim": r["optimizer_bytes"]}

    def full_params():
        full = px.zero.full_state_dict(model)
        return {n: full[n] for n, _ in model.named_parameters()}

    return _Provider(name or f"parallax-{stage}", model, list(model.transformer.h), opt.backward, opt.step, opt.zero_grad,
                     model_states, full_params)


class _Sampler:
    """Model-state samples at block boundaries of forward and backward (only while ``active``)."""

    def __init__(self) -> None:
        self.active: _Provider | None = None
        self.samples: list[tuple[str, dict[str, int]]] = []

    def take(self, where: str) -> None:
        if self.active is not None:
            self.samples.append((where, self.active.model_states()))

    def attach(self, provider: _Provider) -> None:
        for i, block in enumerate(provider.blocks):
            block.register_forward_pre_hook(self._pre(i))
            block.register_forward_hook(self._post(i))

    def _pre(self, i):
        def hook(module, args):
            if self.active is None:
                return
            self.take(f"forward block {i}")
            x = args[0] if args else None
            if x is not None and x.requires_grad:
                x.register_hook(lambda g: self.take(f"backward block {i} done") or None)

        return hook

    def _post(self, i):
        def hook(module, args, output):
            if self.active is None:
                return
            self.take(f"forward block {i} done")
            if getattr(output, "requires_grad", False):
                output.register_hook(lambda g: self.take(f"backward block {i}") or None)

        return hook


def _batch(rank: int, k: int, args):
    import torch

    g = torch.Generator().manual_seed(10_000 * rank + k)
    idx = torch.randint(0, args["vocab"], (args["batch"], args["seq"] + 1), generator=g)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def _step_fn(p: _Provider, rank: int, args, sampler: _Sampler):
    from time import perf_counter

    def step() -> None:
        x, y = _batch(rank, p.calls, args)
        p.calls += 1
        t0 = perf_counter()
        loss = p.model(x, y)
        t1 = perf_counter()
        sampler.take("after forward")
        p.backward(loss)
        t2 = perf_counter()
        sampler.take("after backward")
        p.step_opt()
        sampler.take("after step")
        p.zero_grad()
        t3 = perf_counter()
        p.phases.append((t1 - t0, t2 - t1, t3 - t2))

    return step


def _rank_main(rank: int, world: int, args: dict) -> dict:
    import torch
    import torch.distributed as dist
    from parallax.models import GPT, GPTConfig

    from .timing import interleave

    config = GPTConfig.from_preset("tiny", n_layer=args["n_layer"], n_embd=args["n_embd"], n_head=args["n_head"],
                                   block_size=args["seq"])
    args = dict(args, vocab=config.vocab_size)
    torch.manual_seed(0)
    state = GPT(config).state_dict()
    psi = GPT(config).num_params(non_embedding=False)
    lr, wd = 1e-3, 0.1

    def base():
        return GPT(config)

    providers: list[_Provider] = []
    for name in args["providers"]:
        if name == "ddp":
            providers.append(_build_ddp(base, state, lr, wd))
        elif name in ("fsdp2", "fsdp2-p1"):
            providers.append(_build_fsdp2(base, state, lr, wd, prefetch=name == "fsdp2-p1"))
        else:
            if name == "parallax-3-p0":
                providers.append(_build_parallax(3, base, state, lr, wd, {**args, "prefetch": 0}, name))
            else:
                providers.append(_build_parallax(int(name.rsplit("-", 1)[1]), base, state, lr, wd, args))
    sampler = _Sampler()
    for p in providers:
        sampler.attach(p)
    steps = {p.name: _step_fn(p, rank, args, sampler) for p in providers}

    timings = interleave(steps, warmup=args["warmup"], repeat=args["steps"], flush=dist.barrier)

    memory = {}
    for p in providers:  # one more step each, instrumented (untimed)
        sampler.active, sampler.samples = p, []
        dist.barrier()
        steps[p.name]()
        sampler.active = None
        memory[p.name] = sampler.samples

    params = {p.name: p.full_params() for p in providers}
    reference = params.get("ddp")
    diffs = {}
    for p in providers:
        if reference is not None:
            diffs[p.name] = max(float((params[p.name][n].float() - t.float()).abs().max())
                                for n, t in reference.items())
    return {
        "rank": rank, "psi": psi, "config": config.to_dict(),
        "times": {name: list(t.times_s) for name, t in timings.items()},
        "phases": {p.name: p.phases[args["warmup"]: args["warmup"] + args["steps"]] for p in providers},
        "memory": memory, "max_diff": diffs,
    }


# --------------------------------------------------------------------------------------------
# parent side


def _settings(ctx) -> dict:
    a = ctx.args
    base = QUICK if ctx.quick else DEFAULT
    settings = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in base.items()}
    providers = [p.strip() for p in a.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"--providers: unknown {unknown}; allowed: {', '.join(PROVIDERS)}")
    if a.ranks < 1 or a.rank_threads < 1:
        raise ValueError("--ranks and --rank-threads must be >= 1")
    return dict(settings, providers=[p for p in PROVIDERS if p in providers], bucket_mb=a.bucket_mb,
                prefetch=a.prefetch, parallax_optimizer=a.parallax_optimizer, rank_threads=a.rank_threads,
                timeout=a.timeout)


def _quantile(xs: list[float], q: float) -> float:
    from .timing import quantile

    return quantile(xs, q)


def run(ctx) -> Iterator[dict]:
    args = _settings(ctx)
    world = ctx.args.ranks
    if ctx.device.type != "cpu":
        ctx.log(f"this benchmark runs on {world} CPU gloo ranks; --device {ctx.device.type} is ignored")
    ctx.log(f"spawning {world} gloo ranks x {args['rank_threads']} thread(s): GPT n_layer={args['n_layer']} "
            f"n_embd={args['n_embd']}, {args['batch']}x{args['seq']} tokens per rank, {args['warmup']} + "
            f"{args['steps']} steps of {', '.join(args['providers'])}")
    # A watchdog for a rank stuck outside a collective: startup, plus a generous 10 s per step.
    steps = (args["warmup"] + args["steps"] + 1) * len(args["providers"])
    results = spawn_gloo(_rank_main, world, args, deadline_s=120 + args["timeout"] + 10 * steps)

    psi = results[0]["psi"]
    ctx.note("method", f"{world} gloo ranks x {args['rank_threads']} thread(s), steps interleaved round-robin with "
                       "an untimed barrier before each; step time = the slower rank's; memory = max over ranks")
    ctx.note("optimizers", f"ddp, fsdp2: torch.optim.AdamW(fused=True); parallax: ZeroOptimizer over "
                           f"{'px.optim.AdamW' if args['parallax_optimizer'] == 'parallax' else 'torch AdamW fused'}")
    ctx.note("formula", "ZeRO paper, fp32 + Adam: 4 Psi params (stage 3: /N) + 4 Psi grads (stages 2-3: /N) + "
                        "8 Psi Adam m,v (stages 1-3: /N); ddp = stage 0, fsdp2 = stage 3")
    ctx.note("mixed precision formula", "the paper's 16 Psi (2 Psi fp16 params + 2 Psi grads + K=12 Psi fp32 "
                                        "master/m/v) would be: " + ", ".join(
                                            f"stage {s} {mixed_precision_formula(s, psi, world) / MB:.2f} MB"
                                            for s in PARALLAX_STAGES))
    ctx.note("states", "max of the after-backward and after-step samples; peak = max over every sample of the step "
                       "(block boundaries of forward/backward included); communication buffers excluded")

    rows = {}
    for name in args["providers"]:
        per_step = [max(r["times"][name][i] for r in results) for i in range(args["steps"])]
        phases = [[max(r["phases"][name][i][j] for r in results) for i in range(args["steps"])] for j in range(3)]
        samples = []  # (where, param, grad, optim) with the max over ranks at each sample point
        for i, (where, _) in enumerate(results[0]["memory"][name]):
            per_rank = [r["memory"][name][i][1] for r in results]
            samples.append((where, {k: max(m[k] for m in per_rank) for k in ("param", "grad", "optim")}))
        totals = [(sum(m.values()), where, m) for where, m in samples]
        states = max((t for t in totals if t[1] in ("after backward", "after step")), key=lambda t: t[0])
        peak = max(totals, key=lambda t: t[0])
        formula = formula_bytes(FORMULA_STAGE[name], psi, world)
        rows[name] = {
            "provider": name, "params": psi, "ranks": world, "model": results[0]["config"],
            "batch": f"{args['batch']}x{args['seq']}", "steps": args["steps"],
            "median_ms": 1e3 * _quantile(per_step, 0.5), "p20_ms": 1e3 * _quantile(per_step, 0.2),
            "p80_ms": 1e3 * _quantile(per_step, 0.8),
            "fwd_ms": 1e3 * _quantile(phases[0], 0.5), "bwd_ms": 1e3 * _quantile(phases[1], 0.5),
            "opt_ms": 1e3 * _quantile(phases[2], 0.5),
            "states_mb": states[0] / MB, "states_at": states[1], "param_mb": states[2]["param"] / MB,
            "grad_mb": states[2]["grad"] / MB, "optim_mb": states[2]["optim"] / MB,
            "formula_mb": formula["total"] / MB, "formula_param_mb": formula["param"] / MB,
            "formula_grad_mb": formula["grad"] / MB, "formula_optim_mb": formula["optim"] / MB,
            "vs_formula": states[0] / formula["total"],
            "peak_mb": peak[0] / MB, "peak_at": peak[1], "peak_param_mb": peak[2]["param"] / MB,
            "peak_grad_mb": peak[2]["grad"] / MB, "peak_optim_mb": peak[2]["optim"] / MB,
            "max_diff": results[0]["max_diff"].get(name),
            "memory_trace": [[where, m["param"] / MB, m["grad"] / MB, m["optim"] / MB] for where, m in samples],
            "step_ms": [1e3 * t for t in per_step],
            "bucket_mb": args["bucket_mb"], "prefetch": args["prefetch"],
            "parallax_optimizer": args["parallax_optimizer"],
        }
    for row in rows.values():
        for ref in ("ddp", "fsdp2"):
            row[f"vs_{ref}"] = row["median_ms"] / rows[ref]["median_ms"] if ref in rows else None
    _note_goals(ctx, rows)
    yield from rows.values()


def _note_goals(ctx, rows: dict[str, dict]) -> None:
    goals = {}

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if "parallax-2" in rows and "ddp" in rows:
        x = rows["parallax-2"]["vs_ddp"]
        goals["parallax-2 step <= 1.05x ddp"] = f"{x:.3f}x, {verdict(x <= 1.05)}"
    if "parallax-3" in rows and "fsdp2" in rows:
        x = rows["parallax-3"]["vs_fsdp2"]
        goals["parallax-3 step <= 1.0x fsdp2"] = f"{x:.3f}x, {verdict(x <= 1.0)}"
        mine, theirs = rows["parallax-3"]["peak_mb"], rows["fsdp2"]["peak_mb"]
        goals["parallax-3 peak memory <= fsdp2's"] = f"{mine:.2f} MB vs {theirs:.2f} MB, {verdict(mine <= theirs)}"
    if "parallax-3" in rows and "fsdp2-p1" in rows:
        mine, theirs = rows["parallax-3"], rows["fsdp2-p1"]
        goals["parallax-3 vs fsdp2-p1 (both prefetch one block): step, peak"] = (
            f"{mine['median_ms'] / theirs['median_ms']:.3f}x, {mine['peak_mb']:.2f} vs {theirs['peak_mb']:.2f} MB, "
            f"{verdict(mine['median_ms'] <= theirs['median_ms'] and mine['peak_mb'] <= theirs['peak_mb'])}")
    if "parallax-3-p0" in rows and "fsdp2" in rows:
        row, theirs = rows["parallax-3-p0"], rows["fsdp2"]["peak_mb"]
        goals["parallax-3 prefetch=0: step <= 1.0x fsdp2, peak <= fsdp2's"] = (
            f"{row['vs_fsdp2']:.3f}x, {row['peak_mb']:.2f} vs {theirs:.2f} MB, "
            f"{verdict(row['vs_fsdp2'] <= 1.0 and row['peak_mb'] <= theirs)}")
    for name, row in rows.items():
        if name.startswith("parallax"):
            x = row["vs_formula"]
            goals[f"{name} states within 5% of formula"] = f"{x:.3f}x, {verdict(abs(x - 1) <= 0.05)}"
    ctx.note("goals", goals)
