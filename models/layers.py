"""Layers of the Llama-style family on parallax's fused ops: RMSNorm, rotary embedding, SwiGLU.

On CUDA tensors the ops run their Triton kernels (forward and backward); on CPU the plain-PyTorch
references, even when tests have set TRITON_INTERPRET=1 (the interpreter is for testing kernels,
not for running models).
"""

import torch
import torch.nn as nn

from parallax import ops


def _backend(x: torch.Tensor) -> str | None:
    return None if x.is_cuda else "reference"


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, H, D) and k (B, T, Hkv, D) rotated by cos/sin (B or 1, T, D // 2) float32 tables."""
    return ops.rotary_embedding(q, k, cos, sin, backend=_backend(q))


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dimension (Hugging Face's numerics:
    normalised in fp32, cast back to x's dtype, then scaled)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        return ops.rms_norm(x, self.weight, self.eps, backend=_backend(x))

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the gated MLP of Llama, Mistral and Qwen."""

    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C)."""
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(ops.swiglu(gate, up, backend=_backend(gate)))
