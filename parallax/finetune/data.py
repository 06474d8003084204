"""Supervised fine-tuning data: JSONL rows rendered into token ids with a per-token loss mask.

A row is ``{"prompt": str, "completion": str}`` (tokens: the prompt, the completion, then EOS),
``{"messages": [{"role", "content"}, ...]}`` rendered with the tokenizer's chat template, or plain
``{"text": str}`` (the text with the tokenizer's special tokens, then EOS; every token trained), the rows
``parallax prep --format jsonl`` writes (a prepared directory reads its ``documents/``).
Which tokens are trained (``loss``):

- "completion": the completion and its EOS; the prompt is out of the loss (prompt/completion rows);
- "assistant": the tokens each assistant message adds to the rendered chat, its end-of-turn token
  included, and nothing else (no system/user turn, no assistant header) (chat rows);
- "all": every token.

``loss=None`` picks "completion" for prompt/completion rows, "assistant" for chats and "all" for text.
An example of L tokens is L - 1 (input, next-token target) pairs, so ``max_length`` counts
positions, as a model's ``block_size`` does: longer examples are cut to max_length + 1 tokens.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parallax.data.prepared import is_prepared, prepared_documents

log = logging.getLogger(__name__)

LOSS_MODES = ("completion", "assistant", "all")
IGNORE_INDEX = -100  # target of a position out of the loss (the models ignore negative targets)


class SFTDataError(ValueError):
    """A data file or row that cannot be made into training examples; the message names it."""


@dataclass(frozen=True)
class SFTExample:
    """One rendered example: ``tokens`` (L,) and ``trained`` (L,), True where token i is in the loss
    (predicted from tokens[:i]); ``source`` says where it came from ("file:line")."""

    tokens: tuple[int, ...]
    trained: tuple[bool, ...]
    source: str

    def __len__(self) -> int:
        """Positions the example occupies in a batch: L - 1 (input, target) pairs."""
        return len(self.tokens) - 1

    def inputs_and_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L - 1,) int64 inputs tokens[:-1] and targets: tokens[i + 1] where trained, else -100.

        The model predicts targets[t] from inputs[:t + 1] (the models take shifted targets, as
        ``parallax train`` does), so the first token is never a target.
        """
        tokens = torch.tensor(self.tokens, dtype=torch.long)
        trained = torch.tensor(self.trained[1:], dtype=torch.bool)
        return tokens[:-1], tokens[1:].masked_fill(~trained, IGNORE_INDEX)

    @property
    def num_trained(self) -> int:
        """Targets in the loss (the first token is never one)."""
        return sum(self.trained[1:])


@dataclass(frozen=True)
class SFTSplits:
    """Training and validation examples (``val`` may be empty)."""

    train: list[SFTExample]
    val: list[SFTExample]


def load_sft_data(path: str | os.PathLike[str], tokenizer: Any, *, max_length: int, loss: str | None = None,
                  val_path: str | os.PathLike[str] | None = None, val_fraction: float = 0.0, seed: int = 0,
                  chat_template: str | None = None) -> SFTSplits:
    """Training examples from ``path`` and validation examples from ``val_path`` or, without it, a
    held-out ``val_fraction`` of the training rows chosen with ``seed``. See ``load_sft_examples``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    if val_path is not None and val_fraction:
        raise ValueError("give either val_path or val_fraction, not both")
    examples = load_sft_examples(path, tokenizer, max_length=max_length, loss=loss, chat_template=chat_template)
    if val_path is not None:
        val = load_sft_examples(val_path, tokenizer, max_length=max_length, loss=loss, chat_template=chat_template)
        return SFTSplits(examples, val)
    return split_validation(examples, val_fraction, seed)


def split_validation(examples: Sequence[SFTExample], fraction: float, seed: int) -> SFTSplits:
    """A seeded random ``fraction`` of the examples (at least one when fraction > 0) held out for
    validation; both parts keep the file order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {fraction}")
    n_val = max(1, round(fraction * len(examples))) if fraction > 0 else 0
    if n_val >= len(examples) and n_val:
        raise ValueError(f"val_fraction={fraction} leaves no training example out of {len(examples)}")
    held_out = set(random.Random(seed).sample(range(len(examples)), n_val))
    return SFTSplits([e for i, e in enumerate(examples) if i not in held_out],
                     [e for i, e in enumerate(examples) if i in held_out])


def load_sft_examples(path: str | os.PathLike[str], tokenizer: Any, *, max_length: int, loss: str | None = None,
                      chat_template: str | None = None) -> list[SFTExample]:
    """The examples of a JSONL file, or of every ``*.jsonl`` file of a directory (sorted by name).

    ``max_length``: the most positions per example (tokens beyond max_length + 1 are cut, and a
    warning counts them); ``loss``: one of ``LOSS_MODES`` or None (see the module docstring);
    ``chat_template``: a template name or text for chat rows (default: the tokenizer's own).
    Examples left with no trained target (e.g. a completion cut off entirely) are dropped with a
    warning. Raises ``SFTDataError`` naming the file, line and field of a bad row.
    """
    if loss is not None and loss not in LOSS_MODES:
        raise ValueError(f"loss must be one of {LOSS_MODES} or None; got {loss!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1; got {max_length}")
    examples, truncated, dropped = [], 0, 0
    for source, row in _rows(Path(path)):
        example = render_row(row, tokenizer, loss, source, chat_template)
        if len(example) > max_length:
            truncated += 1
            example = SFTExample(example.tokens[:max_length + 1], example.trained[:max_length + 1], source)
        if example.num_trained == 0:
            dropped += 1
            continue
        examples.append(example)
    if truncated:
        log.warning("%d of %d examples in %s were longer than max_length=%d and were truncated",
                    truncated, len(examples) + dropped, path, max_length)
    if dropped:
        log.warning("%d examples in %s had no trained token (after truncation) and were dropped", dropped, path)
    if not examples:
        raise SFTDataError(f"{os.fspath(path)}: no example with a trained token")
    return examples


def _rows(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """("file:line", row) for each non-blank line of the file or directory's *.jsonl files."""
    if is_prepared(path):
        path = prepared_documents(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise SFTDataError(f"{path}: the directory has no *.jsonl file")
    elif path.is_file():
        files = [path]
    else:
        raise SFTDataError(f"{path}: no such file or directory")
    for file in files:
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                source = f"{file}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SFTDataError(f"{source}: not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise SFTDataError(f"{source}: a row must be a JSON object; got {type(row).__name__}")
                yield source, row


def render_row(row: Mapping[str, Any], tokenizer: Any, loss: str | None, source: str,
               chat_template: str | None = None) -> SFTExample:
    """One row as an ``SFTExample`` (no truncation); ``SFTDataError`` naming ``source`` and the field."""
    if "messages" in row:
        if loss == "completion":
            raise SFTDataError(f"{source}: loss='completion' needs prompt/completion rows; this row has 'messages' "
                               "(use loss='assistant' or 'all')")
        return _render_chat(row["messages"], tokenizer, loss or "assistant", source, chat_template)
    if loss == "assistant":
        raise SFTDataError(f"{source}: loss='assistant' needs chat rows with 'messages'; this row has none")
    if "prompt" not in row and "completion" not in row and "text" in row:
        return _render_text(row["text"], tokenizer, loss, source)
    for field in ("prompt", "completion"):
        if field not in row:
            raise SFTDataError(f"{source}: the row has no {field!r} field (a row needs 'prompt' and 'completion', "
                               f"'messages', or 'text'); it has {sorted(row)}")
        if not isinstance(row[field], str):
            raise SFTDataError(f"{source}: {field!r} must be a string; got {type(row[field]).__name__}")
    return _render_completion(row["prompt"], row["completion"], tokenizer, loss or "completion", source)


def _render_completion(prompt: str, completion: str, tokenizer: Any, loss: str, source: str) -> SFTExample:
    eos = _eos_id(tokenizer)
    # Tokenized apart so the prompt/completion boundary is exact; the prompt gets the tokenizer's
    # special tokens (a BOS), as a generation from that prompt would.
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    completion_ids = [*tokenizer.encode(completion, add_special_tokens=False), eos]
    tokens = (*prompt_ids, *completion_ids)
    trained = (loss == "all",) * len(prompt_ids) + (True,) * len(completion_ids)
    return SFTExample(tuple(tokens), trained, source)


def _render_text(text: Any, tokenizer: Any, loss: str | None, source: str) -> SFTExample:
    if not isinstance(text, str):
        raise SFTDataError(f"{source}: 'text' must be a string; got {type(text).__name__}")
    if loss not in (None, "all"):
        raise SFTDataError(f"{source}: loss={loss!r} needs prompt/completion or chat rows; a text row trains "
                           "every token (use loss='all' or 'auto')")
    tokens = (*tokenizer.encode(text, add_special_tokens=True), _eos_id(tokenizer))
    return SFTExample(tokens, (True,) * len(tokens), source)


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eot_id", None)
    if eos is None:
        raise SFTDataError(f"the tokenizer {getattr(tokenizer, 'source', tokenizer)!r} has no EOS token to end "
                           "completions with")
    return int(eos)


def _render_chat(messages: Any, tokenizer: Any, loss: str, source: str, chat_template: str | None) -> SFTExample:
    _check_messages(messages, source)
    if chat_template is None and not getattr(tokenizer, "chat_templates", None):
        raise SFTDataError(f"{source}: chat rows need a chat template and the tokenizer "
                           f"{getattr(tokenizer, 'source', tokenizer)!r} has none; use a tokenizer directory with "
                           "one, or pass chat_template")

    def ids(upto: int, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages[:upto], add_generation_prompt=generation_prompt,
                                             tokenize=False, chat_template=chat_template)
        return tokenizer.encode(text, add_special_tokens=False)

    tokens = ids(len(messages), False)
    if loss == "all":
        return SFTExample(tuple(tokens), (True,) * len(tokens), source)
    trained = [False] * len(tokens)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The tokens the assistant message adds after its header (the generation prompt) are trained.
        start = _prefix_length(ids(i, True), tokens, source, i)
        end = _prefix_length(ids(i + 1, False), tokens, source, i + 1)
        trained[start:end] = [True] * (end - start)
    return SFTExample(tuple(tokens), tuple(trained), source)


def _prefix_length(prefix: list[int], tokens: list[int], source: str, upto: int) -> int:
    """len(prefix), after checking that the whole chat's tokens start with it."""
    if tokens[:len(prefix)] != prefix:
        raise SFTDataError(f"{source}: the chat template renders the first {upto} messages differently inside the "
                           "whole conversation than alone, so the assistant turns' tokens cannot be located; "
                           "use loss='all' or a template whose renderings extend each other")
    return len(prefix)


def _check_messages(messages: Any, source: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"{source}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        for field in ("role", "content"):
            if not isinstance(message, dict) or field not in message:
                raise SFTDataError(f"{source}: messages[{i}] has no {field!r} field")


# ------------------------------------------------------------------------------------ display

_ANSI_TRAINED, _ANSI_RESET = "\x1b[1;32m", "\x1b[0m"


def format_masks(examples: Sequence[SFTExample], tokenizer: Any, n: int, color: bool | None = None) -> str:
    """The first n examples as text with the trained tokens highlighted: bold green on a terminal
    (``color=None`` asks whether stdout is one), ``[[...]]`` around them otherwise. End-of-text
    tokens without text show as ``<eos>``."""
    if color is None:
        color = sys.stdout.isatty()
    opening, closing = (_ANSI_TRAINED, _ANSI_RESET) if color else ("[[", "]]")
    blocks = []
    for number, example in enumerate(examples[:n], 1):
        parts = []
        for trained, ids in _runs(example):
            text = _decode(tokenizer, ids)
            parts.append(f"{opening}{text}{closing}" if trained else text)
        header = (f"--- example {number} ({example.source}): {len(example.tokens)} tokens, "
                  f"{example.num_trained} trained ---")
        blocks.append(header + "\n" + "".join(parts))
    return "\n".join(blocks)


def _runs(example: SFTExample) -> Iterator[tuple[bool, list[int]]]:
    """Maximal runs of consecutive tokens with the same trained flag."""
    start = 0
    for i in range(1, len(example.tokens) + 1):
        if i == len(example.tokens) or example.trained[i] != example.trained[start]:
            yield example.trained[start], list(example.tokens[start:i])
            start = i


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """Text of ids, with each token that decodes to nothing (an EOT without text) shown as <eos>."""
    pieces, pending = [], []
    for token in ids:
        if tokenizer.decode([token]) == "":
            pieces.append(tokenizer.decode(pending) + "<eos>")
            pending = []
        else:
            pending.append(token)
    return "".join(pieces) + tokenizer.decode(pending)
