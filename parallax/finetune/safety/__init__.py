"""Safety data for fine-tuning: the shipped set (``train.jsonl``, ``preferences.jsonl``; see
README.md) and mixing it into a task's rows at a chosen ratio (``--safety-data FILE
--safety-ratio 0.1``).

    rows = safety_rows("builtin", style="completion")        # rendered like the task's rows
    mixed = mix_rows(task_rows, rows, ratio=0.1, seed=0)     # 10% of ``mixed`` are safety rows

A safety file holds bare requests: SFT rows ``{"prompt", "completion"}`` or preference rows
``{"prompt", "chosen", "rejected"}`` (other fields such as ``category`` are kept out). They are
rendered in the task data's style: "completion" puts the request in ``PROMPT_TEMPLATE`` and a
space before each answer (as the fine-tuning demo's rows are); "chat" makes a user turn and an
assistant turn, so the tokenizer's chat template applies.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from parallax.finetune.data import SFTDataError, _rows

__all__ = ["BUILTIN", "SFT_DATA", "PREFERENCE_DATA", "PROMPT_TEMPLATE", "STYLES", "resolve_safety_path",
           "safety_rows", "mix_rows", "safety_count", "data_style"]

HERE = Path(__file__).parent
BUILTIN = "builtin"  # the value of --safety-data that names the shipped set
SFT_DATA = HERE / "train.jsonl"
PREFERENCE_DATA = HERE / "preferences.jsonl"
PROMPT_TEMPLATE = "Request: {prompt}\nAnswer:"
STYLES = ("completion", "chat")
_ANSWER_FIELDS = {"sft": ("completion",), "preference": ("chosen", "rejected")}

Row = TypeVar("Row")


def resolve_safety_path(value: str | os.PathLike[str], *, preferences: bool = False) -> Path:
    """The file ``--safety-data`` names: ``BUILTIN`` is the shipped SFT set (``preferences``: the
    shipped preference set), anything else a path."""
    if os.fspath(value) == BUILTIN:
        return PREFERENCE_DATA if preferences else SFT_DATA
    return Path(value)


def safety_rows(path: str | os.PathLike[str], style: str, *, preferences: bool = False) -> list[dict[str, Any]]:
    """The rows of a safety JSONL file rendered in ``style``; ``BUILTIN`` names the shipped SFT set,
    or with ``preferences`` the shipped preference set (a file may hold either kind of row).

    completion: ``{"prompt": "Request: ...\\nAnswer:", "completion": " ..."}`` (SFT) or
    ``{"prompt", "chosen": " ...", "rejected": " ..."}`` (preference);
    chat: ``{"messages": [user, assistant]}`` (SFT) or ``{"prompt": [user], "chosen": [assistant],
    "rejected": [assistant]}`` (preference, TRL's conversational format).
    Every row also gets ``source``: "file:line". Raises ``SFTDataError`` naming the file and line of
    a row with a missing or non-string field, ``ValueError`` for an unknown style.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}; got {style!r}")
    file = resolve_safety_path(path, preferences=preferences)
    if not file.is_file():
        raise SFTDataError(f"--safety-data: {file} is not a file (give a JSONL file or '{BUILTIN}')")
    rows = [_render(row, style, source) for source, row in _rows(file)]
    if not rows:
        raise SFTDataError(f"--safety-data: {file} has no rows")
    return rows


def safety_count(n_task: int, ratio: float) -> int:
    """Safety rows to add to ``n_task`` task rows so that they are ``ratio`` of the mix:
    round(ratio / (1 - ratio) * n_task)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"safety ratio must be in [0, 1); got {ratio!r}")
    return round(ratio / (1.0 - ratio) * n_task)


def mix_rows(task_rows: Sequence[Row], safety: Sequence[Row], ratio: float, seed: int) -> list[Row]:
    """The task rows plus ``safety_count(len(task_rows), ratio)`` safety rows, shuffled with ``seed``.

    The safety rows are drawn in seeded shuffled passes over ``safety``, so each is used once before
    any repeats. Works on any row type (dicts, rendered examples).
    """
    count = safety_count(len(task_rows), ratio)
    if count and not safety:
        raise ValueError("mix_rows: no safety rows to mix in")
    rng = random.Random(seed)
    drawn: list[Row] = []
    while len(drawn) < count:
        order = list(safety)
        rng.shuffle(order)
        drawn += order[:count - len(drawn)]
    mixed = [*task_rows, *drawn]
    rng.shuffle(mixed)
    return mixed


def data_style(path: str | os.PathLike[str]) -> str:
    """"chat" when the first row of a JSONL file (or a directory's first *.jsonl file) has
    ``messages``, else "completion"."""
    for _, row in _rows(Path(path)):
        return "chat" if "messages" in row else "completion"
    raise SFTDataError(f"{os.fspath(path)}: no rows")


def _render(row: dict[str, Any], style: str, source: str) -> dict[str, Any]:
    kind = "preference" if "chosen" in row or "rejected" in row else "sft"
    for field in ("prompt", *_ANSWER_FIELDS[kind]):
        if not isinstance(row.get(field), str):
            raise SFTDataError(f"--safety-data {source}: the row needs a string {field!r} (safety rows are "
                               "{prompt, completion} or {prompt, chosen, rejected}); "
                               f"got {type(row.get(field)).__name__ if field in row else 'none'}")
    prompt = row["prompt"]
    if style == "completion":
        rendered = {"prompt": PROMPT_TEMPLATE.format(prompt=prompt)}
        rendered.update({field: " " + row[field] for field in _ANSWER_FIELDS[kind]})
    elif kind == "sft":
        rendered = {"messages": [_turn("user", prompt), _turn("assistant", row["completion"])]}
    else:
        rendered = {"prompt": [_turn("user", prompt)], "chosen": [_turn("assistant", row["chosen"])],
                    "rejected": [_turn("assistant", row["rejected"])]}
    rendered["source"] = source
    return rendered


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}
