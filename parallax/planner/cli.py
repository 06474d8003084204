"""``parallax plan``: print the memory plan of a GPT preset (or a bare parameter count) as a table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from parallax.models import ALL_PRESETS
from parallax.planner.cost import Hardware
from parallax.planner.search import OFFLOADS, PRECISIONS, STAGES, plan
from parallax.planner.states import BACKENDS

__all__ = ["plan_main", "build_parser"]


def build_parser(prog: str = "parallax plan") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Predict each rank's peak memory for every ZeRO stage x precision x offload x activation "
                    "checkpointing, and pick the fastest configuration that fits.",
        epilog="Sizes: GB/MB = powers of 1000, GiB/MiB (and a bare G/M) = powers of 1024; nvidia-smi shows MiB. "
               "Exit status: 0 a configuration fits, 1 none fits, 2 bad arguments.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--preset", default=None, help=f"model preset ({', '.join(ALL_PRESETS)}; default tiny)")
    what.add_argument("--params", default=None, help="a bare parameter count instead of a model (e.g. 7e9): "
                                                     "activations unknown")
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field of the preset, e.g. --model n_layer=24 (repeatable)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (default 1)")
    p.add_argument("--device-memory", required=True, metavar="SIZE", help="memory of one device, e.g. 16GB, 80GiB, or 'auto' (this machine's: the "
                                                              "GPU's total memory, else RAM / LOCAL_WORLD_SIZE)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the preset's block_size; a longer one raises block_size, "
                        "as parallax train --block-size does)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per rank and step (default 1)")
    p.add_argument("--stages", default=",".join(map(str, STAGES)), help="candidate ZeRO stages (default 0,1,2,3)")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="candidate precisions (default fp32,bf16,fp16)")
    p.add_argument("--offload", default=",".join(OFFLOADS), help="candidate offload modes (default none,cpu)")
    p.add_argument("--checkpointing", default="none,block",
                   help="candidate activation checkpointing policies: none, block, every_n:K (default none,block)")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="RuntimeConfig.bucket_mb (default 25)")
    p.add_argument("--prefetch", type=int, default=1, help="RuntimeConfig.prefetch (default 1)")
    p.add_argument("--backend", choices=BACKENDS, default="nccl", help="collective backend (default nccl)")
    p.add_argument("--margin", type=float, default=0.10,
                   help="fraction of device memory kept free for what the plan does not model (default 0.10)")
    p.add_argument("--layers", type=int, default=None, help="with --params: equal blocks the model is made of")
    p.add_argument("--tp", default="1", help="candidate tensor-parallel degrees, e.g. 1,2,4 or auto (default 1)")
    p.add_argument("--pp", default="1", help="candidate pipeline-parallel degrees, e.g. 1,2 or auto (default 1)")
    p.add_argument("--micro-batches", default="1",
                   help="candidate micro-batch counts splitting --micro-batch, e.g. 1,4 or auto (default 1)")
    p.add_argument("--schedule", default="1f1b", help="pipeline schedule: gpipe, 1f1b, interleaved (default 1f1b)")
    p.add_argument("--virtual-stages", type=int, default=1, help="model chunks per rank (interleaved; default 1)")
    p.add_argument("--sequence-parallel", action="store_true", help="tensor parallelism with sequence parallelism")
    for f in dataclasses.fields(Hardware):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=int if f.type == "int" else float,
                       default=None, help=f"step-time model: {f.name} (default {f.default:g})")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    return p


def _model(args: argparse.Namespace):
    from parallax.models import ALL_PRESETS, config_from_preset
    from parallax.models.config import parse_overrides

    if args.params is not None:
        if args.model:
            raise ValueError("--model overrides a preset's fields; it does not apply to --params")
        try:
            count = float(args.params)
        except ValueError:
            raise ValueError(f"--params must be a number, got {args.params!r}") from None
        if not count.is_integer() or count < 1:
            raise ValueError(f"--params must be a positive whole number, got {args.params!r}")
        return int(count)
    preset = args.preset or "tiny"
    if preset not in ALL_PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; known presets: {', '.join(ALL_PRESETS)}")
    overrides = parse_overrides(args.model)
    if args.seq_len is not None and args.seq_len > overrides.get("block_size", config_from_preset(preset).block_size):
        overrides["block_size"] = args.seq_len
    return config_from_preset(preset, **overrides) if overrides else preset


def _list(text: str, kind=str) -> list:
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"cannot read the list {text!r}") from None


def _degrees(text: str) -> list[int] | str:
    return "auto" if text.strip() == "auto" else _list(text, int)


def plan_main(argv: list[str] | None = None, prog: str = "parallax plan") -> int:
    """Entry point of ``parallax plan``; returns the exit status (0 fits, 1 nothing fits, 2 bad input)."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        hardware = Hardware(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Hardware)
                               if getattr(args, f.name) is not None})
        result = plan(_model(args), args.world_size, args.device_memory, args.seq_len, args.micro_batch,
                      stages=_list(args.stages, int), precisions=_list(args.precisions),
                      offloads=_list(args.offload), checkpointing=_list(args.checkpointing),
                      bucket_mb=args.bucket_mb, prefetch=args.prefetch, backend=args.backend, margin=args.margin,
                      hardware=hardware, layers=args.layers, tp=_degrees(args.tp), pp=_degrees(args.pp),
                      micro_batches=_degrees(args.micro_batches), schedule=args.schedule,
                      virtual_stages=args.virtual_stages, sequence_parallel=args.sequence_parallel)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(result.table())
    return 0 if result.best is not None else 1
