"""``parallax compress quantize|prune|low-rank``: compress a trained model and write a loadable
directory (``px.compress.save``), with optional recovery fine-tuning.

    parallax compress quantize --checkpoint RUN --bits 4 --group-size 128 --method gptq --out q4
    parallax compress prune --hf DIR --method structured --sparsity 0.25 --recover-steps 200 --out p25
    parallax compress low-rank --checkpoint RUN --energy 0.9 --out lr90

The output loads with ``--checkpoint OUT`` in ``parallax generate``, ``parallax eval`` and
``parallax compress`` (so methods stack: prune, then quantize).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

__all__ = ["compress_main", "build_parser"]

log = logging.getLogger(__name__)

_CALIBRATED = {("quantize", "gptq"), ("prune", "wanda"), ("prune", "2:4"), ("prune", "structured")}


def build_parser(prog: str = "parallax compress") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Compress a trained model (quantize, prune, low-rank) "
                                     "into a directory that --checkpoint loads in generate, eval and compress.")
    methods = parser.add_subparsers(dest="what", required=True, metavar="{quantize,prune,low-rank}")
    common = argparse.ArgumentParser(add_help=False)
    source = common.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a parallax train/finetune checkpoint or run directory, or a "
                                             "compressed directory (default: the default run's newest checkpoint)")
    source.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory (with its tokenizer)")
    common.add_argument("--tokenizer", help="byte or a tokenizer directory (default: the model's)")
    common.add_argument("--out", required=True, help="the directory to write (replaced atomically)")
    common.add_argument("--calib", default="built-in",
                        help="calibration text: built-in (the built-in corpus) or a file/directory "
                             "`parallax train --data` reads; only its training split is used")
    common.add_argument("--samples", type=int, default=128, help="calibration sequences (default 128)")
    common.add_argument("--seq-len", type=int, default=None,
                        help="tokens per calibration sequence (default: min(256, the model's context))")
    common.add_argument("--seed", type=int, default=0, help="seed of the calibration and recovery windows")
    recovery = common.add_argument_group("recovery fine-tuning (prune, low-rank)")
    recovery.add_argument("--recover-steps", type=int, default=0, help="AdamW steps after compressing (default 0: none)")
    recovery.add_argument("--recover-lr", type=float, default=1e-4)
    recovery.add_argument("--recover-batch-size", type=int, default=8)
    recovery.add_argument("--recover-lora", type=int, default=None, metavar="R",
                          help="recover with LoRA of rank R (merged at the end) instead of full fine-tuning")

    quantize = methods.add_parser("quantize", parents=[common], help="weight-only int8 / int4 quantization")
    quantize.add_argument("--bits", type=int, choices=(8, 4), default=8)
    quantize.add_argument("--group-size", type=int, default=None,
                          help="int4: weights per scale/zero point (32, 64, 128; default 128); int8: per channel")
    quantize.add_argument("--method", choices=("rtn", "gptq"), default="rtn", help="round-to-nearest or GPTQ")
    quantize.add_argument("--activations", choices=("none", "int8"), default="none",
                          help="int8: dynamic per-token int8 activations too (W8A8; --bits 8)")
    quantize.add_argument("--damp", type=float, default=0.01, help="GPTQ: Hessian dampening (fraction of its mean diagonal)")
    quantize.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")

    prune = methods.add_parser("prune", parents=[common], help="unstructured, 2:4 or structured pruning")
    prune.add_argument("--method", choices=("magnitude", "wanda", "2:4", "structured"), default="magnitude",
                       help="magnitude; wanda (|W| x ||X||, calibrated); 2:4 (2 of every 4 inputs kept by the Wanda "
                            "score); structured (MLP channels removed by calibrated importance)")
    prune.add_argument("--sparsity", type=float, default=None,
                       help="fraction of weights (structured: of MLP channels) removed, in (0, 1); default 0.5 "
                            "(2:4: fixed at 0.5)")
    prune.add_argument("--scope", choices=("layer", "global"), default="layer",
                       help="unstructured: rank weights within each layer or across all of them")
    prune.add_argument("--targets", default="mlp",
                       help="structured: what is removed, comma-separated: mlp (channels), heads (key/value head "
                            "groups with their query heads; Llama-family models); default mlp")

    low_rank = methods.add_parser("low-rank", parents=[common], help="truncated-SVD factorization of each linear layer")
    budget = low_rank.add_mutually_exclusive_group()
    budget.add_argument("--energy", type=float, default=None,
                        help="per layer, the smallest rank keeping this share of squared singular values (default 0.9)")
    budget.add_argument("--budget", type=float, default=None,
                        help="global: keep this fraction of the target layers' parameters")
    budget.add_argument("--rank", type=int, default=None, help="one rank for every layer")
    return parser


def compress_main(argv: list[str], prog: str = "parallax compress") -> int:
    """Entry point of ``parallax compress``; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from parallax import compress
    from parallax.train.model_source import load_trained

    try:
        _check_args(args)
        model, tokenizer, source = load_trained(args.checkpoint, args.hf, None, args.tokenizer)
        model.eval()
        steps = compress.read_manifest(source.removeprefix("compressed:"))["steps"] if source.startswith(
            "compressed:") else []
        seq_len = args.seq_len or min(256, model.config.block_size)
        calib = None
        if (args.what, getattr(args, "method", None)) in _CALIBRATED:
            calib = compress.calibration_tokens(tokenizer, args.calib, samples=args.samples, seq_len=seq_len,
                                                seed=args.seed)
        start = time.perf_counter()
        step = _apply(args, model, calib)
        step["seconds"] = round(time.perf_counter() - start, 3)
        steps.append(step)
        if args.recover_steps:
            windows = compress.calibration_tokens(tokenizer, args.calib,
                                                  samples=args.recover_steps * args.recover_batch_size,
                                                  seq_len=seq_len + 1, seed=args.seed + 1)
            report = compress.recover(model, windows, steps=args.recover_steps, lr=args.recover_lr,
                                      batch_size=args.recover_batch_size, lora_r=args.recover_lora, seed=args.seed)
            steps.append({"method": "recover", **report})
        out = compress.save(model, args.out, tokenizer=tokenizer, steps=steps)
    except (ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    params = sum(t.numel() for t in model.state_dict().values())
    log.info("%s: %s from %s -> %s (%d stored values)", prog, json.dumps(steps[-1]), source, out, params)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    for name in ("samples", "recover_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len: expected a positive int, got {args.seq_len}")
    if args.recover_steps < 0:
        raise ValueError(f"--recover-steps: expected 0 (no recovery) or more, got {args.recover_steps}")
    if args.what == "quantize" and args.recover_steps and args.recover_lora is None:
        raise ValueError("--recover-steps on a quantized model needs --recover-lora R (the integer weights do not train)")


def _apply(args: argparse.Namespace, model: Any, calib: Any) -> dict[str, Any]:
    """Run the method in place; the step record for the manifest."""
    from parallax import compress

    if args.what == "quantize":
        group_size = args.group_size if args.group_size is not None or args.bits == 8 else 128
        activations = None if args.activations == "none" else args.activations
        compress.quantize(model, bits=args.bits, group_size=group_size, method=args.method, calib=calib,
                          activations=activations, damp=args.damp, act_order=args.act_order)
        return {"method": "quantize", "bits": args.bits, "group_size": group_size, "algorithm": args.method,
                "activations": activations}
    if args.what == "prune":
        sparsity = 0.5 if args.sparsity is None else args.sparsity
        extra = ({"scope": args.scope} if args.method in ("magnitude", "wanda") else
                 {"targets": tuple(t.strip() for t in args.targets.split(","))} if args.method == "structured" else {})
        compress.prune(model, sparsity=sparsity, method=args.method, calib=calib, **extra)
        return {"method": "prune", "kind": args.method, "sparsity": sparsity, **extra}
    if args.budget is not None:
        compress.low_rank(model, budget=args.budget)
        return {"method": "low_rank", "budget": args.budget}
    if args.rank is not None:
        compress.low_rank(model, rank=args.rank)
        return {"method": "low_rank", "rank": args.rank}
    energy = 0.9 if args.energy is None else args.energy
    compress.low_rank(model, energy=energy)
    return {"method": "low_rank", "energy": energy}
