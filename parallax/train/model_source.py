"""``load_trained``: the model and tokenizer that ``--checkpoint`` / ``--hf`` / ``--adapter`` name, for
``parallax generate``, ``parallax eval`` and the lm-eval backend.

A checkpoint (or run directory) of ``parallax train`` or ``parallax finetune`` loads with its
tokenizer (a fine-tuning run's checkpoints carry their adapter); ``--hf DIR`` loads a Hugging Face
directory; either flag also takes a directory of ``parallax compress`` / ``px.compress.save``; ``--adapter DIR`` adds a PEFT-format adapter (LoRA or prefix) on top of either, and on
its own loads the base its ``adapter_config.json`` names (``base_model_name_or_path``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["load_trained"]


def load_trained(checkpoint: str | None = None, hf: str | None = None, adapter: str | None = None,
                 tokenizer: str | None = None) -> tuple[nn.Module, Any, str]:
    """(model on CPU, tokenizer, a description of where it came from). With neither checkpoint
    nor hf nor adapter: the default run's newest checkpoint. ValueError naming the flag otherwise."""
    from parallax import compress
    from parallax.data import load_tokenizer

    if adapter is not None and checkpoint is None and hf is None:
        checkpoint, hf = _adapter_base(Path(adapter))
    compressed = next((p for p in (checkpoint, hf) if p is not None and compress.is_compressed(p)), None)
    if compressed is not None:
        model, tok = compress.load(compressed), _compressed_tokenizer(compressed, tokenizer)
        source = f"compressed:{compressed}"
    elif hf is not None:
        from parallax.models import from_hf

        model, tok, source = from_hf(hf), load_tokenizer(tokenizer or hf), f"hf:{hf}"
    else:
        from parallax.inference.cli import find_checkpoint
        from parallax.train.checkpoints import load_model
        from parallax.train.checkpoints import load_tokenizer as run_tokenizer

        path = find_checkpoint(checkpoint)
        model, source = load_model(path), str(path)
        tok = run_tokenizer(path) if tokenizer is None else load_tokenizer(tokenizer)
    if adapter is not None:
        from parallax import peft

        peft.load_adapter(model, adapter)
        source += f" + adapter {adapter}"
    return model, tok, source


def _compressed_tokenizer(directory: str, tokenizer: str | None) -> Any:
    """``--tokenizer`` when given, else the tokenizer the compressed model records (bytes when none)."""
    from parallax.compress import read_manifest
    from parallax.data import load_tokenizer
    from parallax.data.tokenizer import tokenizer_from_reference

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    reference = read_manifest(directory).get("tokenizer")
    return load_tokenizer("byte") if reference is None else tokenizer_from_reference(reference, directory)


def _adapter_base(adapter: Path) -> tuple[str | None, str | None]:
    """(checkpoint, hf): the base that an adapter directory's config names."""
    config = adapter / "adapter_config.json"
    if not config.is_file():
        raise ValueError(f"--adapter {adapter}: no adapter_config.json (a PEFT adapter directory holds it)")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ValueError(f"--adapter {adapter}: its base_model_name_or_path ({base!r}) is not a local directory; "
                         "give the base with --checkpoint or --hf")
    from parallax.checkpoint.sharded import MANIFEST

    if (Path(base) / MANIFEST).is_file():
        return base, None
    return None, base
