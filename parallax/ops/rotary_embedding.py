"""Rotary position embeddings for q and k (one Triton launch for both): launcher, checks,
autograd, reference.

``rotary_embedding(q, k, cos, sin)`` rotates q (B, T, H, D) and k (B, T, H_kv, D) by the angles
whose cosines and sines are cos and sin (B or 1, T, D/2), in Hugging Face's non-interleaved
("rotate_half") convention: with x1 = x[..., :D/2] and x2 = x[..., D/2:],
out = cat(x1 cos - x2 sin, x2 cos + x1 sin). The tables hold each frequency once (D/2 columns),
where Hugging Face's ``apply_rotary_pos_emb`` takes them repeated to D columns.

Numerics: computed in fp32 and rounded once to the input dtype. For fp32 inputs this is
``apply_rotary_pos_emb`` to the bit; for 16-bit inputs Hugging Face rounds cos and sin and every
product to the input dtype, which this op does not (it is more accurate).

q and k are read through their strides (views of a fused QKV projection need no copy); a batch of
1 in cos and sin (or a stride-0 expand) serves every batch entry. Returns new contiguous tensors;
the inputs are not modified. cos and sin get no gradient.

Dispatch (``parallax.ops.backend("rotary_embedding", device)``, or ``backend=`` per call): see
``parallax.ops._triton``: Triton on CUDA, ``rotary_embedding_ref`` on CPU unless
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from parallax.ops import _triton

Tensor = torch.Tensor

__all__ = ["rotary_embedding", "rotary_embedding_ref", "backend", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements of each half (x1 or x2) one program rotates: BLOCK_R (token, head) rows x D/2 (padded).
_TILE = 2048


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation ``rotary_embedding`` uses by default for tensors on ``device``: 'triton' or 'reference'."""
    return _triton.default_backend(device)


# --------------------------------------------------------------------------------------------
# checks


def _check(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    op = "rotary_embedding"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}")
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{op}: q has dtype {q.dtype}; supported: float16, bfloat16, float32")
    if k.dtype != q.dtype:
        raise ValueError(f"{op}: k has dtype {k.dtype} but q has {q.dtype}; q and k must share a dtype")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    B, T, _, D = q.shape
    if D == 0 or D % 2:
        raise ValueError(f"{op}: q has head dim D={D}; it must be even and positive (the rotation pairs "
                         "x[..., i] with x[..., i + D/2])")
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, T, D):
        raise ValueError(f"{op}: k has shape {tuple(k.shape)}; for q of shape {tuple(q.shape)} it must be "
                         f"({B}, {T}, H_kv, {D})")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}; it must be float32 (angles kept at full precision)")
        if t.dim() != 3 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (T, D // 2):
            raise ValueError(f"{op}: {name} must have shape ({B} or 1, {T}, {D // 2}) = (batch, seqlen, head_dim/2) "
                             f"for q of shape {tuple(q.shape)}, got {tuple(t.shape)}")


# --------------------------------------------------------------------------------------------
# launcher


def _table_strides(t: Tensor) -> tuple[int, int, int]:
    """Strides of a cos/sin table; batch stride 0 when it has one batch entry (shared by all)."""
    sb, st, sd = t.stride()
    return (0 if t.shape[0] == 1 else sb), st, sd


def _rotate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """q and k rotated by the angles of cos/sin (by their opposites when ``inverse``), contiguous."""
    kernels = _triton.kernels("rotary_embedding", "rotary_embedding", q.device)
    B, T, H, D = q.shape
    H_kv = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q_rows, k_rows = B * T * H, B * T * H_kv  # one row per (token, head)
    if q_rows + k_rows == 0:
        return q_out, k_out
    half = D // 2
    half_pad = max(16, 1 << (half - 1).bit_length())
    block_r = max(1, min(1 << (max(q_rows, k_rows) - 1).bit_length(), _TILE // half_pad))
    q_blocks, k_blocks = -(-q_rows // block_r), -(-k_rows // block_r)
    kernels._rotary_embedding[(q_blocks + k_blocks,)](
        q, k, q_out, k_out, cos, sin, T, H, H_kv, q_rows, k_rows, q_blocks, *q.stride(), *k.stride(),
        *_table_strides(cos), *_table_strides(sin), HALF=half, HALF_PAD=half_pad, BLOCK_R=block_r, INVERSE=inverse,
        num_warps=4)
    return q_out, k_out


class _RotaryEmbedding(torch.autograd.Function):
    """Rotation of q and k in one launch; the backward rotates the gradients back (one launch)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, inverse=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate(dq_out, dk_out, cos, sin, inverse=True)
        return dq, dk, None, None


# --------------------------------------------------------------------------------------------
# public function and reference


def rotary_embedding(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *,
                     backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Rotary position embeddings applied to q and k, differentiable in q and k.

    q (B, T, H, D) and k (B, T, H_kv, D): fp16, bf16 or fp32 (the same), D even, any strides.
    cos and sin (B or 1, T, D/2) float32: the cosines and sines of each position's angles, one
    column per frequency. Returns (q_out, k_out), new contiguous tensors of q's and k's shapes
    and dtype, with out = cat(x1 cos - x2 sin, x2 cos + x1 sin) for x1, x2 the two halves of
    the head dim (Hugging Face's rotate_half convention), computed in fp32.
    ``backend``: 'triton', 'reference' or None (the default for the device, see ``backend``).
    """
    _check(q, k, cos, sin)
    if _triton.pick("rotary_embedding", backend, q.device) == "reference":
        return rotary_embedding_ref(q, k, cos, sin)
    return _RotaryEmbedding.apply(q, k, cos, sin)


def rotary_embedding_ref(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Plain PyTorch ``rotary_embedding``: fp32 (float64 for float64 inputs, an exact reference),
    rounded to the input dtype."""
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


def _rotate_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos = cos.to(compute).unsqueeze(2)  # (B or 1, T, 1, D/2): broadcast over heads
    sin = sin.to(compute).unsqueeze(2)
    x1, x2 = x.to(compute).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
