"""Checkpoints: sharded, reshardable state checkpoints (save / load / consolidate) and activation checkpointing."""

from parallax.checkpoint.activation import activation
from parallax.checkpoint.sharded import (
    CheckpointError,
    consolidate,
    full_tensors,
    load,
    locate,
    read_manifest,
    remove,
    save,
)

__all__ = ["CheckpointError", "activation", "consolidate", "full_tensors", "load", "locate", "read_manifest", "remove",
           "save"]
