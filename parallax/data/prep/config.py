"""``PrepConfig``: what ``parallax prep`` reads, which stages run with which thresholds, where it writes.

A TOML (or JSON) file holds the run's options at the top level and one table per stage, named as in
the stage registry (``parallax.data.prep.stages``)::

    workers = 4
    format = ["tokens", "jsonl"]
    [gopher_quality]
    min_doc_words = 50
    [toxic]
    enabled = false

Relative paths (``input``, ``out``, ``tokenizer``) are taken relative to the current directory, as on
the command line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from parallax.data.prep.stages import STAGE_NAMES

__all__ = ["PrepConfig", "load_prep_config", "FORMATS", "EXECUTORS", "ON_ERROR"]

FORMATS = ("tokens", "jsonl")
EXECUTORS = ("local", "ray")
ON_ERROR = ("skip", "fail")


@dataclass(kw_only=True)
class PrepConfig:
    """One preparation run.

    ``format``: any of "tokens" (DIR/tokens.bin + tokens.json, what ``parallax train --data DIR`` reads)
    and "jsonl" (DIR/documents/NNNNN.jsonl, the kept documents). ``tokenizer``: anything
    ``parallax.data.load_tokenizer`` takes (None = the byte tokenizer). ``executor``: "local" (processes
    on this machine) or "ray" (Ray tasks; ``ray_address`` of a running cluster, None = start a local
    one). ``samples``: removed examples kept per stage in the report, and kept examples in
    samples/kept.jsonl. ``stages``: per-stage options by registry name ({"toxic": {"enabled": False}}).
    """

    input: str | None = None
    out: str
    format: tuple[str, ...] = ("tokens",)
    tokenizer: str | None = None
    text_field: str = "text"
    executor: str = "local"
    workers: int = 1
    ray_address: str | None = None
    on_error: str = "skip"
    overwrite: bool = False
    samples: int = 20
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.input, os.PathLike):
            self.input = os.fspath(self.input)
        if isinstance(self.out, os.PathLike):
            self.out = os.fspath(self.out)
        if self.input is not None and (not isinstance(self.input, str) or not self.input):
            raise ValueError(f"input must be a non-empty path, a directory or a glob pattern; got {self.input!r}")
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must be a non-empty directory path; got {self.out!r}")
        if isinstance(self.format, str):
            self.format = tuple(part.strip() for part in self.format.split(",") if part.strip())
        self.format = tuple(self.format) if isinstance(self.format, (list, tuple)) else self.format
        if (not isinstance(self.format, tuple) or not self.format or len(set(self.format)) != len(self.format)
                or any(f not in FORMATS for f in self.format)):
            raise ValueError(f"format must be a non-empty list of distinct values among {', '.join(FORMATS)}; "
                             f"got {self.format!r}")
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            self.tokenizer = os.fspath(self.tokenizer)
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"text_field must be a non-empty field name; got {self.text_field!r}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}; got {self.executor!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an integer >= 1; got {self.workers!r}")
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address):
            raise ValueError(f"ray_address must be a Ray cluster address (e.g. 'auto' or 'ray://host:10001') "
                             f"or None; got {self.ray_address!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}; got {self.on_error!r}")
        if not isinstance(self.overwrite, bool):
            raise ValueError(f"overwrite must be true or false; got {self.overwrite!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 0:
            raise ValueError(f"samples must be an integer >= 0; got {self.samples!r}")
        if not isinstance(self.stages, dict):
            raise ValueError(f"stages must map stage names to option tables; got {type(self.stages).__name__}")
        for name, options in self.stages.items():
            if name not in STAGE_NAMES:
                raise ValueError(f"stages: unknown stage {name!r}; expected one of {', '.join(STAGE_NAMES)}")
            if not isinstance(options, dict):
                raise ValueError(f"stages: [{name}] must be a table of options; got {options!r}")

    def fingerprint_fields(self) -> dict[str, Any]:
        """The options that decide the output (where and how it runs do not: the same output comes from
        1 or 4 workers, local or Ray), so a rerun with other ``workers`` resumes the same run."""
        return {"format": list(self.format), "tokenizer": self.tokenizer, "text_field": self.text_field,
                "on_error": self.on_error, "samples": self.samples,
                "stages": {name: self.stages[name] for name in sorted(self.stages)}}


_TOP_LEVEL = tuple(f.name for f in fields(PrepConfig) if f.name != "stages")


def load_prep_config(path: str | os.PathLike[str], **overrides: Any) -> PrepConfig:
    """The ``PrepConfig`` in the TOML (``.toml``) or JSON (``.json``) file ``path``; ``overrides`` (e.g.
    command-line flags; None values are ignored) replace the file's values.

    Top-level keys are ``PrepConfig`` fields; tables are stages by registry name. An unknown key or
    table raises ValueError naming it and what is allowed.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"config {path}: cannot read ({exc.strerror or exc})") from None
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"config {path}: invalid TOML ({exc})") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"config {path}: invalid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"config {path}: expected a JSON object at the top level")
    else:
        raise ValueError(f"config {path}: expected a .toml or .json file")
    values: dict[str, Any] = {}
    stages: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if key in STAGE_NAMES:
            if not isinstance(value, dict):
                raise ValueError(f"config {path}: [{key}] must be a table of the stage's options")
            stages[key] = value
        elif key in _TOP_LEVEL:
            values[key] = value
        else:
            raise ValueError(f"config {path}: unknown key {key!r}; expected one of {', '.join(_TOP_LEVEL)} or a "
                             f"stage table ({', '.join(STAGE_NAMES)})")
    for key, value in overrides.items():
        if key not in _TOP_LEVEL:
            raise ValueError(f"unknown option {key!r}; expected one of {', '.join(_TOP_LEVEL)}")
        if value is not None:
            values[key] = value
    if "out" not in values:
        raise ValueError(f"config {path}: no output directory: set out in the file or pass --out")
    if "format" in values and isinstance(values["format"], list):
        values["format"] = tuple(values["format"])
    try:
        return PrepConfig(**values, stages=stages)
    except ValueError as exc:
        raise ValueError(f"config {path}: {exc}") from None
