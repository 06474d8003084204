"""What every compression method shares: which linear layers it acts on, module replacement by
name, calibration tokens, and the registry of compressed module kinds that checkpoints rebuild.

Targets (torchao's convention): every ``nn.Linear`` of the model except the output head (the
fused loss and the engine read ``lm_head.weight`` as a plain matrix, and GPT ties it to the
token embedding; AutoGPTQ and llm-compressor leave it unquantized by default too), unless
``filter_fn(module, fqn)`` returns False for it.

Compressed module kinds (``QuantLinear``, ``LowRankLinear``, ...) register themselves with
``register_module``: each has ``spec() -> dict`` (JSON: what is needed to rebuild it empty) and a
classmethod ``from_spec(spec) -> nn.Module``; ``px.compress.save`` records the spec of every
replaced module by its qualified name and ``px.compress.load`` rebuilds them before loading the
state dict.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["FilterFn", "target_linears", "set_module", "output_head", "register_module", "module_kinds",
           "calibration_tokens", "check_calibration"]

FilterFn = Callable[[nn.Module, str], bool]

_KINDS: dict[str, type[nn.Module]] = {}


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's LM head (``model.lm_head``), or None when it has none."""
    return getattr(model, "lm_head", None)


def target_linears(model: nn.Module, filter_fn: FilterFn | None = None) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every ``nn.Linear`` a method acts on, in module order."""
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    head = output_head(model)
    found = []
    for fqn, module in model.named_modules():
        if type(module) is not nn.Linear or module is head:
            continue
        if filter_fn is None or filter_fn(module, fqn):
            found.append((fqn, module))
    return found


def set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Replace the submodule at ``fqn`` (e.g. ``transformer.h.0.mlp.c_fc``) with ``new``."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def register_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make ``cls`` (with ``spec()`` and ``from_spec``) rebuildable by ``px.compress.load``."""
    if not (callable(getattr(cls, "spec", None)) and callable(getattr(cls, "from_spec", None))):
        raise TypeError(f"{cls.__name__} needs spec() and a classmethod from_spec(spec) to be registered")
    _KINDS[cls.__name__] = cls
    return cls


def module_kinds() -> dict[str, type[nn.Module]]:
    """Registered compressed module classes by name."""
    return dict(_KINDS)


def check_calibration(calib: Any, method: str, *, min_samples: int = 1) -> torch.Tensor:
    """``calib`` as a (N, T) int64 token tensor; ValueError naming ``calib`` and ``method`` otherwise."""
    if calib is None:
        raise ValueError(f"calib: method {method!r} needs calibration data, a (N, T) tensor of token ids "
                         "(see px.compress.calibration_tokens)")
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        shape = tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__
        raise ValueError(f"calib: expected a (N, T) integer tensor of token ids, got {shape}")
    if calib.shape[0] < min_samples:
        raise ValueError(f"calib: method {method!r} needs at least {min_samples} calibration sequences, "
                         f"got {calib.shape[0]}")
    return calib.long()


def calibration_tokens(tokenizer: Any, source: str | None = None, *, samples: int = 32, seq_len: int = 256,
                       seed: int = 0) -> torch.Tensor:
    """(samples, seq_len) token ids drawn from the training split of ``source`` (a file or directory
    ``parallax train --data`` reads; None or ``"built-in"``: the built-in corpus), at random
    windows chosen with ``seed``. The held-out split is never used, so perplexity measured on it
    stays honest. ValueError when the split holds fewer than ``samples * seq_len`` tokens."""
    from parallax.data import load_dataset

    for name, value in (("samples", samples), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    path = None if source in (None, "built-in") else source
    data = load_dataset(path, tokenizer=tokenizer)
    train = data.tokens[:data.split_point]
    if len(train) < samples * seq_len:
        raise ValueError(f"calib: {data.source} has {len(train)} training tokens, fewer than the "
                         f"{samples} x {seq_len} = {samples * seq_len} needed (lower --samples or --seq-len)")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - seq_len + 1, (samples,), generator=generator)
    import numpy as np

    rows = np.stack([np.asarray(train[s:s + seq_len], dtype=np.int64) for s in starts.tolist()])
    return torch.from_numpy(rows)
