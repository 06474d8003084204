"""Preference data: JSONL rows ``{"prompt", "chosen", "rejected"}`` rendered into pairs of token
sequences that share the prompt, each with a mask of the completion tokens in the loss.

A row is either strings (tokens: the prompt, the completion, then EOS, as ``parallax finetune``
renders prompt/completion rows) or TRL's conversational form: ``prompt`` a list of chat messages,
``chosen`` and ``rejected`` lists of assistant messages, rendered with the tokenizer's chat
template; only the completion's tokens (after the prompt's generation header) are in the loss.
Bad rows raise ``SFTDataError`` naming the file, line and field: a missing or mistyped field,
chosen equal to rejected (no preference to learn), a prompt leaving no room for a completion.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parallax.finetune.data import (
    SFTDataError,
    SFTExample,
    _check_messages,
    _prefix_length,
    _rows,
    render_row,
    split_validation,
)

__all__ = ["PreferencePair", "PreferenceSplits", "load_preference_data", "load_preference_pairs", "render_pair"]

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """The chosen and the rejected completion of one prompt, each a full sequence (prompt tokens
    out of the loss, completion tokens in it)."""

    chosen: SFTExample
    rejected: SFTExample

    @property
    def source(self) -> str:
        return self.chosen.source

    def __len__(self) -> int:
        """Positions of the longer sequence."""
        return max(len(self.chosen), len(self.rejected))


@dataclass(frozen=True)
class PreferenceSplits:
    train: list[PreferencePair]
    val: list[PreferencePair]


def load_preference_data(path: str | os.PathLike[str], tokenizer: Any, *, max_length: int,
                         val_path: str | os.PathLike[str] | None = None, val_fraction: float = 0.0, seed: int = 0,
                         chat_template: str | None = None,
                         extra_train: Sequence[Mapping[str, Any]] = ()) -> PreferenceSplits:
    """Training pairs from ``path`` (plus ``extra_train`` rows, e.g. safety data) and validation
    pairs from ``val_path`` or a seeded held-out ``val_fraction`` of ``path``'s rows."""
    if val_path is not None and val_fraction:
        raise ValueError("give either val_path or val_fraction, not both")
    pairs = load_preference_pairs(path, tokenizer, max_length=max_length, chat_template=chat_template)
    if val_path is not None:
        splits = PreferenceSplits(pairs, load_preference_pairs(val_path, tokenizer, max_length=max_length,
                                                               chat_template=chat_template))
    else:
        held = split_validation(range(len(pairs)), val_fraction, seed)
        splits = PreferenceSplits([pairs[i] for i in held.train], [pairs[i] for i in held.val])
    extra = [render_pair(row, tokenizer, max_length, f"extra row {i}", chat_template)
             for i, row in enumerate(extra_train)]
    return PreferenceSplits(splits.train + extra, splits.val)


def load_preference_pairs(path: str | os.PathLike[str], tokenizer: Any, *, max_length: int,
                          chat_template: str | None = None) -> list[PreferencePair]:
    """The pairs of a JSONL file, or of every ``*.jsonl`` file of a directory (sorted by name).
    ``max_length`` counts positions (a model's block_size): completions are cut to fit, a prompt
    that leaves no room for one is an error."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2; got {max_length}")
    pairs = [render_pair(row, tokenizer, max_length, source, chat_template) for source, row in _rows(Path(path))]
    if not pairs:
        raise SFTDataError(f"{os.fspath(path)}: no preference rows")
    return pairs


def render_pair(row: Mapping[str, Any], tokenizer: Any, max_length: int, source: str,
                chat_template: str | None = None) -> PreferencePair:
    """One row as a ``PreferencePair`` (completions cut to ``max_length`` positions)."""
    for field in FIELDS:
        if field not in row:
            raise SFTDataError(f"{source}: the row has no {field!r} field (a preference row needs "
                               f"{', '.join(FIELDS)}); it has {sorted(row)}")
    conversational = not isinstance(row["prompt"], str)
    for field in FIELDS:
        if isinstance(row[field], str) == conversational:
            kind = "lists of chat messages" if conversational else "strings"
            raise SFTDataError(f"{source}: {field!r} must be {kind} like 'prompt' "
                               f"(a row is all strings or all chat messages); got {type(row[field]).__name__}")
    if row["chosen"] == row["rejected"]:
        raise SFTDataError(f"{source}: 'chosen' equals 'rejected': the row states no preference")
    render = _render_chat_pair if conversational else _render_text_pair
    chosen, rejected = (render(row["prompt"], row[field], tokenizer, source, chat_template)
                        for field in ("chosen", "rejected"))
    prompt_positions = chosen.trained.index(True) - 1  # inputs before the first trained target
    if prompt_positions >= max_length:
        raise SFTDataError(f"{source}: 'prompt' is {prompt_positions + 1} tokens, leaving no room for a completion "
                           f"within the model's {max_length} positions; shorten it or raise block_size")
    return PreferencePair(_cut(chosen, max_length), _cut(rejected, max_length))


def _render_text_pair(prompt: str, completion: str, tokenizer: Any, source: str,
                      chat_template: str | None) -> SFTExample:
    return render_row({"prompt": prompt, "completion": completion}, tokenizer, "completion", source)


def _render_chat_pair(prompt: Any, completion: Any, tokenizer: Any, source: str,
                      chat_template: str | None) -> SFTExample:
    """prompt + completion rendered whole; trained: what follows the prompt's generation header."""
    _check_messages(prompt, source)
    _check_messages(completion, source)
    if any(m["role"] != "assistant" for m in completion):
        raise SFTDataError(f"{source}: 'chosen' and 'rejected' must hold assistant messages only")
    if chat_template is None and not getattr(tokenizer, "chat_templates", None):
        raise SFTDataError(f"{source}: chat rows need a chat template and the tokenizer "
                           f"{getattr(tokenizer, 'source', tokenizer)!r} has none")

    def ids(messages: list, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False,
                                             chat_template=chat_template)
        return tokenizer.encode(text, add_special_tokens=False)

    tokens = ids([*prompt, *completion], False)
    start = _prefix_length(ids(prompt, True), tokens, source, len(prompt))
    return SFTExample(tuple(tokens), (False,) * start + (True,) * (len(tokens) - start), source)


def _cut(example: SFTExample, max_length: int) -> SFTExample:
    return SFTExample(example.tokens[:max_length + 1], example.trained[:max_length + 1], example.source)
