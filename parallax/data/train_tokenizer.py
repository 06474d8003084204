"""Train a byte-level BPE tokenizer on local text and write it as a Hugging Face tokenizer directory.

The result (``tokenizer.json`` + ``tokenizer_config.json``) loads identically with
``parallax.data.load_tokenizer(dir)`` and ``transformers.AutoTokenizer.from_pretrained(dir)``:
GPT-2's byte-level pre-tokenizer (every byte is in the alphabet, so no text is unknown and every
text round-trips), ``<|endoftext|>`` as eos (and pad, and the document separator of token caches),
``<|im_start|>``/``<|im_end|>`` for the ChatML chat template its config carries.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from parallax.data.chat import DEFAULT_CHAT_TEMPLATE
from parallax.data.errors import TokenizerError
from parallax.data.hf_tokenizer import CONFIG_FILE, TOKENIZER_FILE, HFTokenizer, tokenizers_library

__all__ = ["train_tokenizer", "SPECIAL_TOKENS", "MIN_VOCAB_SIZE"]

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens, no merge yet


def train_tokenizer(documents: Iterable[str], vocab_size: int, out: str | os.PathLike[str], *,
                    min_frequency: int = 2, overwrite: bool = False) -> HFTokenizer:
    """Train byte-level BPE with at most ``vocab_size`` ids on ``documents`` (merges never cross
    a document boundary; pairs seen fewer than ``min_frequency`` times are not merged) and write
    it to the directory ``out`` atomically: a complete directory appears under that name, or none.

    ``out`` must not exist, or be empty, unless ``overwrite``. Returns the written tokenizer.
    Raises ``TokenizerError`` for a bad argument or ``out``, before any training.
    """
    tk = tokenizers_library()
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 bytes + "
                             f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise TokenizerError(f"min_frequency must be a positive integer, got {min_frequency!r}")
    out = Path(out).expanduser()
    _check_out(out, overwrite)

    t0 = time.perf_counter()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    tokenizer.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                     special_tokens=list(SPECIAL_TOKENS),
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer)
    trained = tokenizer.get_vocab_size()
    if trained < vocab_size:
        log.warning("tokenizer: the text has too few distinct pairs seen >= %d times for %d ids; the vocabulary "
                    "has %d", min_frequency, vocab_size, trained)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    }
    _write_directory(out, {TOKENIZER_FILE: tokenizer.to_str(), CONFIG_FILE: json.dumps(config, indent=2) + "\n"},
                     overwrite)
    log.info("tokenizer: %d ids trained in %.1fs, written to %s", trained, time.perf_counter() - t0, out)
    return HFTokenizer(out)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"--out {out} is a file; expected a directory to create")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TokenizerError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")


def _write_directory(out: Path, files: dict[str, str], overwrite: bool) -> None:
    """Write ``files`` (name -> text) into a hidden temporary directory beside ``out``, fsync
    them, then rename it to ``out`` (a previous ``out`` is renamed away first and deleted after)."""
    from parallax.checkpoint.sharded import _fsync_path, _hidden_name, _mkdir_durably, _rename_durably

    _check_out(out, overwrite)
    _mkdir_durably(out.parent)
    tmp = _hidden_name(out, "tmp")
    tmp.mkdir()
    try:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
            _fsync_path(tmp / name)
        _fsync_path(tmp)
        old = None
        if out.exists():
            old = _hidden_name(out, "trash")
            _rename_durably(out, old)
        _rename_durably(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
