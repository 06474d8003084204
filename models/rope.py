"""Rotary position embeddings: inverse frequencies (with Llama 3's and linear scaling) and the
cos/sin tables for given positions. The rotation itself is ``parallax.ops.rotary_embedding``."""

import math
from typing import Any

import torch

# rope_scaling types and the keys each needs (besides "rope_type"/"type").
ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The scaling type of a rope_scaling dict ("rope_type", or the older "type" key); "default" for None."""
    if scaling is None:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def check_rope_scaling(name: str, scaling: dict[str, Any] | None) -> None:
    """Raise ValueError naming ``name`` unless scaling is None or a supported, complete rope_scaling."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"{name} must be None or a dict; got {scaling!r}")
    kind = rope_type(scaling)
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"{name} has rope_type {kind!r}, which parallax does not implement "
                         f"(supported: {sorted(ROPE_SCALING_KEYS)}); refusing to ignore it silently")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in scaling]
    if missing:
        raise ValueError(f"{name} of rope_type {kind!r} lacks {missing}")
    for key in ROPE_SCALING_KEYS[kind]:
        if not isinstance(scaling[key], (int, float)) or isinstance(scaling[key], bool) or not scaling[key] > 0:
            raise ValueError(f"{name}[{key!r}] must be a positive number; got {scaling[key]!r}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"{name}: high_freq_factor must be larger than low_freq_factor; got {scaling}")


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies theta^(-2i/head_dim), scaled per rope_scaling.

    Computed on the CPU in float32 with Hugging Face's operation order, so that imported models
    rotate by bit-identical angles on every device.
    """
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kind = rope_type(scaling)
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        inv = _llama3_scale(inv, scaling)
    return inv


def _llama3_scale(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths are divided by ``factor``, short
    ones kept, and the band between them interpolated smoothly."""
    old_len = s["original_max_position_embeddings"]
    low_wavelen = old_len / s["low_freq_factor"]
    high_wavelen = old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s["factor"], inv)
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, T, D // 2) float32 for integer positions (B, T) and inv_freq (D // 2,)."""
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D // 2)
    return angles.cos(), angles.sin()
