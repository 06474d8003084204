"""Reading what ``parallax prep`` wrote: a prepared directory holds ``prep.json`` (its marker),
``tokens.bin`` + ``tokens.json`` (every kept document's tokens, a token-cache entry keyed "tokens") and,
with ``--format jsonl``, the kept documents in ``documents/*.jsonl``.

``parallax train --data DIR`` memory-maps the tokens when they were made with the tokenizer the run
uses; otherwise it tokenizes ``documents/`` (through the ordinary cache), and with neither it says how
to re-run ``parallax prep``. ``parallax finetune --data DIR`` reads ``documents/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from parallax.data import cache
from parallax.data.errors import DataError

__all__ = ["MARKER", "TOKENS_KEY", "DOCUMENTS", "is_prepared", "prepared_info", "prepared_tokens",
           "prepared_documents"]

MARKER = "prep.json"
TOKENS_KEY = "tokens"  # DIR/tokens.bin + DIR/tokens.json, written by cache.write_entry(DIR, TOKENS_KEY, ...)
DOCUMENTS = "documents"


def is_prepared(path: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` is a directory ``parallax prep`` wrote to (finished or not)."""
    return path is not None and (Path(path).expanduser() / MARKER).is_file()


def prepared_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``prep.json`` of a prepared directory; ``DataError`` if the run did not finish."""
    root = Path(path).expanduser()
    try:
        info = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{root / MARKER}: unreadable ({exc})") from None
    if not isinstance(info, dict) or not info.get("complete"):
        raise DataError(f"{root}: `parallax prep` has not finished writing this directory; run the same "
                        f"`parallax prep --out {root}` again to resume it")
    return info


def prepared_tokens(path: str | os.PathLike[str], tokenizer_desc: dict[str, Any]
                    ) -> tuple[np.memmap, dict[str, Any]] | None:
    """The prepared tokens (a read-only (N,) memmap) and their sidecar when they were made by the tokenizer
    ``tokenizer_desc`` describes (``Tokenizer.describe()``); None when there are none or another
    tokenizer made them."""
    root = Path(path).expanduser()
    prepared_info(root)
    entry = cache.read_entry(root, TOKENS_KEY)
    if entry is None or entry[1].get("tokenizer") != tokenizer_desc:
        return None
    return entry


def prepared_documents(path: str | os.PathLike[str], tokenizer_source: str | None = None) -> Path:
    """``DIR/documents``, the kept documents as JSONL; ``DataError`` explaining how to get them when the
    directory was prepared without ``--format jsonl``."""
    root = Path(path).expanduser()
    info = prepared_info(root)
    documents = root / DOCUMENTS
    if not any(documents.glob("*.jsonl")):
        made_with = (info.get("tokenizer") or {}).get("source", "another tokenizer") if isinstance(
            info.get("tokenizer"), dict) else "another tokenizer"
        wanted = f" (this run uses {tokenizer_source})" if tokenizer_source else ""
        raise DataError(f"{root}: prepared as tokens of {made_with} only{wanted}; re-run `parallax prep` with "
                        "--tokenizer set to this run's tokenizer, or with --format tokens,jsonl to keep the documents")
    return documents
