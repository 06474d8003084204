"""Checkpoints: sharded, reshardable state checkpoints (save / load / consolidate)."""

from parallax.checkpoint.sharded import CheckpointError, consolidate, load, read_manifest, save

__all__ = ["CheckpointError", "consolidate", "load", "read_manifest", "save"]
