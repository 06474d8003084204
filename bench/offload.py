"""Optimizer offload: step time with ``offload="cpu"`` against the optimizer on the device.

One process (a world-size-1 process group: NCCL on CUDA, gloo on CPU), the reference GPT in
bf16 at ZeRO stage 1, the same batches for both providers, steps interleaved. With offload the
fp32 master shard and the Adam moments live in pinned host memory and the C++ CPU AdamW updates
one flat buffer while the next one's gradients copy in (``parallax.offload.HostAdamW``). On a
machine without a GPU the same code runs with host-to-host copies, so the ratio there shows the
pipeline's overhead rather than PCIe. Goal (issue 4, on an H100/H200): at most 1.3x.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch

from .table import Column
from .timing import interleave

COLUMNS = [
    Column("model", "model"),
    Column("params", "params [M]", ".1f", scale=1e-6),
    Column("provider", "provider"),
    Column("median_ms", "median [ms/step]", ".1f"),
    Column("p20_ms", "p20 [ms]", ".1f"),
    Column("p80_ms", "p80 [ms]", ".1f"),
    Column("vs_device", "vs device [x]", ".3f"),
    Column("max_diff", "max diff", ".1e"),
]

# name -> (GPTConfig overrides of the "gpt2" preset, batch, seq) for CUDA; CPU uses a small one.
CUDA_MODEL = ({"n_layer": 12, "n_embd": 768, "n_head": 12}, 8, 1024)
CPU_MODEL = ({"n_layer": 4, "n_embd": 256, "n_head": 4, "block_size": 128, "vocab_size": 257}, 8, 128)


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--steps", type=int, default=None, help="timed steps per provider (default 20; --quick 4)")


def _providers(device: torch.device, overrides: dict, batch: int, seq: int):
    import torch.distributed as dist

    import parallax as px
    from parallax.models import GPT, GPTConfig

    created = not dist.is_initialized()
    if created:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    config = GPTConfig.from_preset("gpt2", **overrides)
    torch.manual_seed(0)
    state = GPT(config).state_dict()
    models = {}
    for offload in ("none", "cpu"):
        model = GPT(config).to(device)
        model.load_state_dict(state)
        models[offload] = px.initialize(model, px.RuntimeConfig(zero_stage=1, precision="bf16", offload=offload),
                                        lr=3e-4, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (batch, seq + 1), generator=gen).to(device) for _ in range(4)]
    counters = {k: 0 for k in models}

    def step_fn(name):
        model, opt = models[name]

        def step() -> None:
            idx = batches[counters[name] % len(batches)]
            counters[name] += 1
            opt.backward(model(idx[:, :-1], idx[:, 1:]))
            opt.step()
            opt.zero_grad()

        return step

    return {f"offload={k}": step_fn(k) for k in models}, models, config, created


def run(ctx) -> Iterator[dict]:
    import torch.distributed as dist

    import parallax as px

    overrides, batch, seq = CUDA_MODEL if ctx.device.type == "cuda" else CPU_MODEL
    if ctx.quick:
        overrides, batch, seq = {**CPU_MODEL[0], "n_layer": 2}, 2, 64
    steps, models, config, created = _providers(ctx.device, overrides, batch, seq)
    try:
        repeat = ctx.args.steps or (4 if ctx.quick else 20)
        timings = interleave(steps, device=ctx.device, warmup=2, repeat=repeat)
        full = {name: px.zero.full_state_dict(models[name.split("=")[1]][0]) for name in steps}
        ref = full["offload=none"]
        device_ms = timings["offload=none"].median_ms
        num_params = sum(p.numel() for p in models["none"][0].parameters())
        ctx.note("setup", f"ZeRO stage 1, bf16, world size 1, batch {batch} x {seq}")
        for name, timing in timings.items():
            diff = max(float((full[name][k].float() - v.float()).abs().max()) for k, v in ref.items())
            yield {"model": f"gpt {config.n_layer}x{config.n_embd}", "params": num_params, "provider": name,
                   "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
                   "vs_device": timing.median_ms / device_ms, "max_diff": diff}
        ratio = timings["offload=cpu"].median_ms / device_ms
        ctx.note("goal", f"offload step time <= 1.3x device: {ratio:.3f}x, {'met' if ratio <= 1.3 else 'NOT met'}"
                 + ("" if ctx.device.type == "cuda" else " (CPU: host-to-host copies; the goal is for a GPU)"))
    finally:
        if created:
            dist.destroy_process_group()
