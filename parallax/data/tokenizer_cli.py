"""``parallax tokenizer train``: train a byte-level BPE tokenizer on local text."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["tokenizer_main", "build_parser"]

DEFAULT_VOCAB_SIZE = 8192


def build_parser(prog: str = "parallax tokenizer") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Tokenizer tools.",
                                     epilog="Exit status: 0 done, 2 bad arguments or input.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="train a byte-level BPE tokenizer on local text",
        description="Train a byte-level BPE tokenizer (GPT-2's byte-level pre-tokenizer; special tokens "
                    "<|endoftext|> (eos, pad, document separator), <|im_start|> and <|im_end|>) and write "
                    "tokenizer.json + tokenizer_config.json (with a ChatML chat template) to --out. Both "
                    "`parallax train --tokenizer DIR` and transformers.AutoTokenizer.from_pretrained(DIR) load it.",
        epilog="Exit status: 0 done, 2 bad arguments or input.")
    train.add_argument("--data", default=None,
                       help="a .txt / .jsonl file or a directory of them (default: the built-in corpus, "
                            "CPython's documentation text)")
    train.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                       help=f"most ids in the vocabulary, special tokens included (fewer when the text has too "
                            f"few repeated pairs); default: {DEFAULT_VOCAB_SIZE}")
    train.add_argument("--min-frequency", type=int, default=2,
                       help="merge only pairs seen at least this often; default: 2")
    train.add_argument("--out", required=True, help="directory to write (created atomically)")
    train.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    return parser


def tokenizer_main(argv: list[str], prog: str = "parallax tokenizer") -> int:
    """Entry point of ``parallax tokenizer``; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from parallax.data import DataError, resolve_source
    from parallax.data.train_tokenizer import train_tokenizer

    try:
        source = resolve_source(args.data)
        tokenizer = train_tokenizer(source.documents(), args.vocab_size, args.out,
                                    min_frequency=args.min_frequency, overwrite=args.overwrite)
    except DataError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    sample = "The quick brown fox jumps over the lazy dog."
    print(f"{tokenizer.directory}: {tokenizer.vocab_size} ids trained on {source.description}; "
          f"{len(sample.encode())} bytes of {sample!r} -> {len(tokenizer.encode(sample))} tokens")
    return 0
