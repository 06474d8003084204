"""The ``parallax`` command: ``train`` (the main job), ``finetune`` (SFT with LoRA, prefix tuning
or all parameters), ``align`` (preference tuning: DPO and its family), ``plan`` (the memory planner), ``generate`` (sampling from a checkpoint),
``serve`` (an OpenAI-compatible HTTP server), ``distill`` (knowledge distillation), ``eval`` (task files, lm-eval's definitions), ``compress`` (quantization, pruning, low rank),
``tokenizer`` (training a BPE tokenizer), ``prep`` (cleaning a corpus into token shards) and ``bench``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main"]


def _train(args: argparse.Namespace, argv: list[str], config_cls: type | None = None) -> int:
    """``parallax train`` (``config_cls`` TrainConfig) or ``parallax distill`` (DistillConfig)."""
    from parallax.data import DataError
    from parallax.train import ConfigError, TrainConfig, train
    from parallax.train.arguments import config_from_args
    from parallax.train.launch import Launch, relaunch_with_torchrun, under_launcher
    from parallax.train.loop import validate_before_launch

    try:
        cfg = config_from_args(args, config_cls or TrainConfig)
        if cfg.world_size > 1 and not under_launcher():
            validate_before_launch(cfg)  # fail once, here, rather than in every rank
            return relaunch_with_torchrun(Launch(cfg.nproc, cfg.nnodes, cfg.node_rank, cfg.master_addr,
                                                 cfg.master_port), argv)
        result = train(cfg)
    except (ConfigError, DataError) as exc:
        print(f"parallax {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if result.sample is not None:
        start = f"{result.initial_val_loss:.3f} -> " if result.initial_val_loss is not None else ""
        print(f"\nval loss {start}{result.val_loss:.3f} after {result.steps} steps, "
              f"{result.tokens_per_s:,.0f} tokens/s; metrics, loss.png and checkpoints in {result.out}/")
        print(f"sample:\n{result.sample}")
    return 0


def _finetune(args: argparse.Namespace, argv: list[str], config_cls: type | None = None) -> int:
    """``parallax finetune`` (``config_cls`` FinetuneConfig) or ``parallax align`` (AlignConfig):
    the same loop, outputs and errors."""
    from parallax.data import DataError
    from parallax.finetune import SFTDataError
    from parallax.finetune.config import FinetuneConfig
    from parallax.finetune.run import finetune
    from parallax.train import ConfigError
    from parallax.train.arguments import config_from_args
    from parallax.train.launch import Launch, relaunch_with_torchrun, under_launcher
    from parallax.train.loop import validate_before_launch

    try:
        cfg = config_from_args(args, config_cls or FinetuneConfig)
        if cfg.show_masks:
            print(_masks(cfg))
            return 0
        if cfg.world_size > 1 and not under_launcher():
            validate_before_launch(cfg)
            return relaunch_with_torchrun(Launch(cfg.nproc, cfg.nnodes, cfg.node_rank, cfg.master_addr,
                                                 cfg.master_port), argv)
        result = finetune(cfg)
    except (ConfigError, DataError, SFTDataError) as exc:
        print(f"parallax {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if result.written is not None:
        run = result.train
        start = f"{run.initial_val_loss:.3f} -> " if run.initial_val_loss is not None else ""
        print(f"\nval loss {start}{run.val_loss:.3f} after {run.steps} steps, {run.tokens_per_s:,.0f} tokens/s; "
              f"metrics, loss.png and checkpoints in {run.out}/, the {cfg.writes} model in {result.written}/")
    return 0


def _masks(cfg) -> str:
    """``--show-masks N``: N training examples (preference tuning: N pairs, chosen then rejected)
    with the tokens in the loss highlighted."""
    from parallax.finetune import format_masks

    tokenizer = cfg.load_tokenizer()
    ds = cfg.load_data(tokenizer, cfg.model_config(tokenizer.vocab_size))
    examples = ds.splits.train
    if examples and hasattr(examples[0], "rejected"):
        examples = [e for pair in examples[:cfg.show_masks] for e in (pair.chosen, pair.rejected)]
        return format_masks(examples, tokenizer, len(examples))
    return format_masks(examples, tokenizer, cfg.show_masks)


def _bench(rest: list[str]) -> int:
    from parallax.bench import main as bench_main

    return bench_main(rest)


def _plan(rest: list[str]) -> int:
    from parallax.planner import plan_main

    return plan_main(rest, prog="parallax plan")


def _generate(rest: list[str]) -> int:
    from parallax.inference.cli import generate_main

    return generate_main(rest, prog="parallax generate")


def _serve(rest: list[str]) -> int:
    from parallax.serve.cli import serve_main

    return serve_main(rest, prog="parallax serve")


def _eval(rest: list[str]) -> int:
    from parallax.eval.cli import eval_main

    return eval_main(rest, prog="parallax eval")


def _compress(rest: list[str]) -> int:
    from parallax.compress.cli import compress_main

    return compress_main(rest, prog="parallax compress")


def _tokenizer(rest: list[str]) -> int:
    from parallax.data.tokenizer_cli import tokenizer_main

    return tokenizer_main(rest, prog="parallax tokenizer")


def _prep(rest: list[str]) -> int:
    from parallax.data.prep.cli import prep_main

    return prep_main(rest, prog="parallax prep")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="parallax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train the reference GPT (default: tiny preset on built-in data)")
    from parallax.train.arguments import add_config_arguments

    add_config_arguments(train_parser)
    from parallax.finetune.config import FinetuneConfig

    finetune_parser = commands.add_parser(
        "finetune", help="supervised fine-tuning of a trained model (--base CHECKPOINT or --hf DIR) on JSONL "
                         "prompt/completion or chat data: --lora, --prefix or --full; --packing; --loss")
    add_config_arguments(finetune_parser, FinetuneConfig)
    from parallax.align.config import AlignConfig

    align_parser = commands.add_parser(
        "align", help="preference tuning (DPO, IPO, hinge, SimPO, ORPO) of a trained model on JSONL "
                      "{prompt, chosen, rejected} rows, with --lora (the reference is the base, adapters "
                      "disabled), --prefix or --full")
    add_config_arguments(align_parser, AlignConfig)
    from parallax.compress.distill_config import DistillConfig

    distill_parser = commands.add_parser(
        "distill", help="knowledge distillation: train a student (--student PRESET|CHECKPOINT or --student-hf DIR) "
                        "on the data and a teacher's distribution (--teacher CHECKPOINT or --teacher-hf DIR); "
                        "--alpha, --temperature, --divergence, --teacher-offload and every train flag")
    add_config_arguments(distill_parser, DistillConfig)
    commands.add_parser("plan", help="predict each rank's peak memory for every ZeRO stage x precision x offload x "
                                     "checkpointing and pick the fastest that fits", add_help=False)
    commands.add_parser("generate", help="generate text from a parallax train checkpoint (paged-KV engine)",
                        add_help=False)
    commands.add_parser("serve", help="serve a checkpoint or a Hugging Face directory over HTTP with the OpenAI "
                                      "API (completions, chat, streaming, LoRA adapters, API key, /metrics)",
                        add_help=False)
    commands.add_parser("eval", help="score a checkpoint or a Hugging Face directory on task files "
                                     "(lm-evaluation-harness's YAML vocabulary and metrics)", add_help=False)
    commands.add_parser("compress", help="quantize (int8, int4 RTN/GPTQ), prune (magnitude, Wanda, 2:4, "
                                         "structured) or factorize (low rank) a trained model into a loadable "
                                         "directory (`parallax compress quantize --help`)", add_help=False)
    commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer on local text (`parallax tokenizer "
                                          "train --help`)", add_help=False)
    commands.add_parser("prep", help="clean a corpus (quality, language, toxic filters, exact and MinHash dedup, "
                                     "PII scrubbing) into token shards for --data (`parallax prep --demo`)",
                        add_help=False)
    commands.add_parser("bench", help="run a microbenchmark (`parallax bench` lists them)", add_help=False)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    if argv[:1] == ["plan"]:
        return _plan(argv[1:])
    if argv[:1] == ["generate"]:
        return _generate(argv[1:])
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    if argv[:1] == ["tokenizer"]:
        return _tokenizer(argv[1:])
    if argv[:1] == ["eval"]:
        return _eval(argv[1:])
    if argv[:1] == ["compress"]:
        return _compress(argv[1:])
    if argv[:1] == ["prep"]:
        return _prep(argv[1:])
    args = parser.parse_args(argv)
    is_main_rank = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if is_main_rank else logging.WARNING, format="%(message)s")
    logging.getLogger("parallax.train.memory").setLevel(logging.INFO)  # the memory report of every rank
    if args.command == "finetune":
        return _finetune(args, argv)
    if args.command == "align":
        return _finetune(args, argv, AlignConfig)
    if args.command == "distill":
        return _train(args, argv, DistillConfig)
    return _train(args, argv)
