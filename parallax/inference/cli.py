"""``parallax generate``: sample from a ``parallax train`` checkpoint or a Hugging Face model
directory with the paged-KV engine."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

__all__ = ["generate_main", "build_parser", "find_checkpoint"]

DEFAULT_RUN = Path("out")  # parallax train's default --out

log = logging.getLogger(__name__)


def build_parser(prog: str = "parallax generate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Generate text from a parallax train checkpoint (decoding with the tokenizer "
                               "the run was trained with) or a Hugging Face model directory (with its "
                               "tokenizer) with the paged-KV inference engine; one prompt streams as it is "
                               "generated.",
        epilog="Exit status: 0 done, 2 bad arguments or no checkpoint.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None,
                        help=f"a checkpoint directory (OUT/checkpoints/step_N) or a run directory OUT (its newest "
                             f"checkpoint); default: the newest under {DEFAULT_RUN}/checkpoints")
    source.add_argument("--hf", default=None, metavar="DIR",
                        help="a Hugging Face model directory (config.json, safetensors, tokenizer.json): GPT-2, "
                             "Llama, Mistral, Qwen2, Qwen3")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT-format adapter (LoRA or prefix, e.g. parallax finetune's OUT/adapter) on the base "
                        "model; alone: the base its adapter_config.json names")
    p.add_argument("--tokenizer", default=None,
                   help="byte or a tokenizer directory (default: the --hf directory, or the one the run was "
                        "trained with, as its checkpoint records it)")
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the tokenizer's chat template (with the "
                        "assistant turn opened)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per sample (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed of the samples (default: random)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default: cuda when available, else cpu")
    return p


def find_checkpoint(path: str | None) -> Path:
    """The checkpoint directory that ``--checkpoint`` names (or the default run's newest one);
    ValueError saying what was looked for when there is none."""
    from parallax.checkpoint.sharded import MANIFEST, locate
    from parallax.train.checkpoints import latest_checkpoint

    if path is None:
        found = latest_checkpoint(DEFAULT_RUN / "checkpoints")
        if found is None:
            raise ValueError(f"no checkpoint under {DEFAULT_RUN / 'checkpoints'}/ (in {Path.cwd()}); "
                             "run `parallax train` first or pass --checkpoint OUT/checkpoints/step_N")
        return found
    candidate = locate(path)  # or its backup, when a save replacing it was interrupted
    if (candidate / MANIFEST).is_file():
        return candidate
    for root in (candidate / "checkpoints", candidate):  # a run directory, or its checkpoints/ directory
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise ValueError(f"--checkpoint {path}: not a checkpoint directory, and no checkpoint under it")


def generate_main(argv: list[str], prog: str = "parallax generate") -> int:
    """Entry point of ``parallax generate``; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import torch

    from parallax.inference import LLM, SamplingParams
    from parallax.train.model_source import load_trained

    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch.cuda.is_available() is False")
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              "cpu" if args.device == "auto" else args.device)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, n=args.n)
        model, tokenizer, path = load_trained(args.checkpoint, args.hf, args.adapter, args.tokenizer)
        model = model.to(device)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"{path}: the model's vocab_size ({model.config.vocab_size}) is smaller than the "
                             f"vocabulary of the tokenizer {tokenizer.source} ({tokenizer.vocab_size} ids)")
        llm = LLM(model, tokenizer=tokenizer, max_num_seqs=max(64, args.n))
        if args.chat:
            args.prompt = [_chat_prompt(tokenizer, prompt) for prompt in args.prompt]
        context = llm.engine.max_model_len
        room = {}  # prompt index -> new tokens the context leaves, where fewer than --max-tokens
        for i, prompt in enumerate(args.prompt):
            prompt_len = len(llm.engine.encode(prompt, f"--prompt #{i + 1}"))
            if prompt_len + args.max_tokens > context + 1:  # the last token is sampled, never fed
                room[i] = context + 1 - prompt_len
                print(f"{prog}: note: --prompt #{i + 1} has {prompt_len} tokens, so the model's {context}-token "
                      f"context leaves room for {room[i]} new tokens, fewer than --max-tokens {args.max_tokens}",
                      file=sys.stderr)
    except (ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    if len(args.prompt) == 1 and args.n == 1:
        outputs = [_stream_one(llm, args.prompt[0], params)]
    else:
        outputs = llm.generate(args.prompt, params)
        for i, out in enumerate(outputs):
            for sample in out.outputs:
                print(f"--- prompt {i + 1}, sample {sample.index + 1} ({sample.finish_reason})")
                print(out.prompt + sample.text)
    elapsed = time.perf_counter() - start
    tokens = sum(len(s.token_ids) for out in outputs for s in out.outputs)
    reasons = sorted({_reason(s, i in room, context) for i, out in enumerate(outputs) for s in out.outputs})
    print(f"[{path}: {tokens} tokens in {elapsed:.2f} s ({tokens / max(elapsed, 1e-9):.1f} tokens/s) on {device}; "
          f"finish: {', '.join(reasons)}]", file=sys.stderr)
    return 0


def _chat_prompt(tokenizer, prompt: str) -> str:
    """The text of one user turn through the tokenizer's chat template, the assistant turn opened."""
    if not hasattr(tokenizer, "apply_chat_template"):
        raise ValueError("--chat needs a tokenizer with a chat template (a Hugging Face tokenizer directory)")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def _reason(sample, context_bound: bool, context: int) -> str:
    """The sample's finish reason, saying when the context rather than --max-tokens ended it."""
    if sample.finish_reason == "length" and context_bound:
        return f"length (the model's {context}-token context)"
    return sample.finish_reason


def _stream_one(llm, prompt: str, params):
    """Print the prompt, then the completion as it is generated; returns the final RequestOutput."""
    sys.stdout.write(prompt)
    shown = 0
    final = None
    for out in llm.stream(prompt, params):
        text = out.text
        # a byte sequence cut mid-character decodes to U+FFFD: hold it back until the rest arrives
        stable = text if out.finished else text.rstrip("\ufffd")
        if len(stable) > shown:
            sys.stdout.write(stable[shown:])
            sys.stdout.flush()
            shown = len(stable)
        final = out
    sys.stdout.write("\n")
    return final
