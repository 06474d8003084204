"""Checkpoints: sharded, reshardable state checkpoints (save / load / consolidate)."""

from parallax.checkpoint.sharded import CheckpointError, consolidate, full_tensors, load, read_manifest, save

__all__ = ["CheckpointError", "consolidate", "full_tensors", "load", "read_manifest", "save"]
