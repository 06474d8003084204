"""The registry of preparation stages, in the order they run.

Per document (phase 1): normalisation, language, Gopher repetition, Gopher quality, C4, toxic text;
then deduplication across all shards (phase 2: exact, then MinHash over the exact survivors); then PII
scrubbing of the kept documents before they are written (phase 3), as FineWeb's pipeline scrubs last.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DOCUMENT_STAGES", "DEDUP_STAGES", "OUTPUT_STAGES", "STAGE_NAMES", "stage_class", "build_stage"]

# name -> "module:class"; imported lazily so a worker only loads what it runs.
DOCUMENT_STAGES: dict[str, str] = {
    "normalize": "parallax.data.prep.normalize:Normalize",
    "language": "parallax.data.prep.language:LanguageFilter",
    "gopher_repetition": "parallax.data.prep.quality:GopherRepetition",
    "gopher_quality": "parallax.data.prep.quality:GopherQuality",
    "c4": "parallax.data.prep.quality:C4Quality",
    "toxic": "parallax.data.prep.toxic:ToxicFilter",
}
DEDUP_STAGES: dict[str, str] = {
    "exact_dedup": "parallax.data.prep.dedup:ExactDedup",
    "minhash_dedup": "parallax.data.prep.dedup:MinHashDedup",
}
OUTPUT_STAGES: dict[str, str] = {
    "pii": "parallax.data.prep.pii:PIIScrubber",
}
STAGE_NAMES: tuple[str, ...] = (*DOCUMENT_STAGES, *DEDUP_STAGES, *OUTPUT_STAGES)


def stage_class(name: str) -> type:
    """The class registered under ``name``; ValueError listing the known names otherwise."""
    target = {**DOCUMENT_STAGES, **DEDUP_STAGES, **OUTPUT_STAGES}.get(name)
    if target is None:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGE_NAMES)}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def build_stage(name: str, options: dict[str, Any] | None = None) -> Any | None:
    """The stage ``name`` built from its options (a TOML table), or None when ``enabled = false``.

    An unknown option raises ValueError naming the stage, the option and the options it has.
    """
    options = dict(options or {})
    enabled = options.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"[{name}] enabled must be true or false, got {enabled!r}")
    if not enabled:
        return None
    cls = stage_class(name)
    known = set(getattr(cls, "__dataclass_fields__", {}))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"[{name}] unknown option(s) {', '.join(unknown)}; it has {', '.join(sorted(known)) or 'none'}")
    return cls(**options)
