"""``parallax train``'s flags: one per ``TrainConfig`` field, then a config file, then the plan."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, get_type_hints

from parallax.models import ALL_PRESETS
from parallax.models.config import parse_overrides
from parallax.train.config import ConfigError, TrainConfig, load_config_file
from parallax.train.planning import PLANNED_FIELDS, resolve_plan

__all__ = ["add_config_arguments", "config_from_args"]


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type[TrainConfig] = TrainConfig) -> None:
    """One flag per field of config_cls (``batch_size`` -> ``--batch-size``), plus ``--config FILE``."""
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of fields; flags override it")
    hints = get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        text = f.metadata["help"].format(presets=", ".join(ALL_PRESETS))
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
        elif f.name == "model":
            parser.add_argument(flag, action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS, help=text)
        else:
            base = next(t for t in (int, float, str) if t in _members(kind))
            default = f"; default: {f.default}" if f.default is not None else ""
            parser.add_argument(flag, type=base, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                choices=f.metadata.get("choices"), help=f"{text}{default}")


def config_from_args(args: argparse.Namespace, config_cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """Defaults, then the config file, then the flags given on the command line; then ``plan``.

    With ``plan`` set, the planner picks the memory fields not given explicitly
    (``parallax.train.planning.resolve_plan``).
    """
    values: dict[str, Any] = load_config_file(args.config, config_cls) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(config_cls):
        if f.name not in vars(args):
            continue
        value = getattr(args, f.name)
        if f.name == "model":
            try:
                value = {**values.get("model", {}), **parse_overrides(value)}
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        values[f.name] = value
    cfg = config_cls(**values)
    if cfg.plan == "off":
        return cfg
    return resolve_plan(cfg, fixed=[name for name in PLANNED_FIELDS if name in values])


def _members(kind: Any) -> tuple[Any, ...]:
    return getattr(kind, "__args__", (kind,))
