"""Knowledge-distillation loss from hidden states, without either model's (N, V) logits.

``distill_loss(student_h, student_head, teacher_h, teacher_head, targets)`` is

    alpha * CE(z_s, targets) + (1 - alpha) * T^2 * D(softmax(z_t / T) || softmax(z_s / T))

with z_s = student_h @ student_head.T and z_t = teacher_h @ teacher_head.T, both terms averaged
over the rows whose target is not ``ignore_index`` (Hinton et al. 2015: the T^2 factor keeps the
soft term's gradient on the scale of the hard term's as T changes; torchtune's KD recipe mixes
the two the same way). The cross-entropy uses the logits at temperature 1. D is, per row, with
p the teacher's and q the student's tempered distribution:

- ``forward_kl``: KL(p || q) (mean-seeking, Hinton's choice);
- ``reverse_kl``: KL(q || p) (mode-seeking, MiniLLM);
- ``jsd``: 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2 (GKD's beta = 0.5).

The rows are processed in chunks of ``chunk`` token rows (one chunk's student and teacher logits
at a time, upcast to fp32; float64 inputs compute in float64). The forward computes the loss
only; the backward recomputes each chunk's logits and gives gradients to ``student_h`` and
``student_head``. The teacher is a constant: its inputs get no gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["distill_loss", "distill_loss_ref", "DIVERGENCES"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

# Default rows per chunk: enough that one chunk's fp32 logits of both models take ~32 MiB.
_CHUNK_BYTES = 32 << 20


def _check(student_h: Any, student_head: Any, teacher_h: Any, teacher_head: Any, targets: Any, alpha: Any,
           temperature: Any, divergence: Any, ignore_index: Any, chunk: Any) -> None:
    name = "distill_loss"
    args = (("student_h", student_h), ("student_head", student_head), ("teacher_h", teacher_h),
            ("teacher_head", teacher_head), ("targets", targets))
    for arg, t in args:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    for arg, t in args[:4]:
        if t.dim() != 2:
            raise ValueError(f"{name}: {arg} must be 2-D, got shape {tuple(t.shape)}")
    n, c = student_h.shape
    if student_head.shape[1] != c:
        raise ValueError(f"{name}: student_head must be (V, C = {c}) to match student_h, got {tuple(student_head.shape)}")
    if teacher_head.shape[1] != teacher_h.shape[1]:
        raise ValueError(f"{name}: teacher_head must be (V, C_t = {teacher_h.shape[1]}) to match teacher_h, "
                         f"got {tuple(teacher_head.shape)}")
    if teacher_head.shape[0] != student_head.shape[0]:
        raise ValueError(f"{name}: the teacher's vocabulary has {teacher_head.shape[0]} tokens but the student's has "
                         f"{student_head.shape[0]} (teacher_head {tuple(teacher_head.shape)}, student_head "
                         f"{tuple(student_head.shape)}); distillation needs one vocabulary (the same tokenizer)")
    if teacher_h.shape[0] != n or targets.shape != (n,):
        raise ValueError(f"{name}: teacher_h must have N = {n} rows and targets shape ({n},) to match student_h, "
                         f"got {tuple(teacher_h.shape)} and {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"{name}: targets must be int64 class indices, got {targets.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{name}: ignore_index must be an int, got {ignore_index!r}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= student_head.shape[0]))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}: targets[{i}] = {int(targets[i])} is outside [0, V = {student_head.shape[0]}) "
                         f"and is not ignore_index ({ignore_index})")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{name}: alpha must be a number in [0, 1] (the weight of the cross-entropy), got {alpha!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"{name}: temperature must be a positive number, got {temperature!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"{name}: divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"{name}: chunk must be a positive int (token rows per chunk) or None, got {chunk!r}")


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _divergence(log_p: Tensor, log_q: Tensor, divergence: str) -> tuple[Tensor, Tensor]:
    """Per-row D(p || q) (rows,) and its gradient with respect to the student's tempered logits
    (rows, V), from the teacher's and student's log-probabilities (rows, V)."""
    q = log_q.exp()
    if divergence == "forward_kl":
        p = log_p.exp()
        return (p * (log_p - log_q)).sum(1), q - p
    if divergence == "reverse_kl":
        f = log_q - log_p
        value = (q * f).sum(1)
        return value, q * (f - value[:, None])  # d/ds_j of sum_i q_i f_i through the softmax
    p = log_p.exp()
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    value = 0.5 * (p * (log_p - log_m)).sum(1) + 0.5 * (q * (log_q - log_m)).sum(1)
    h = 0.5 * (log_q - log_m)  # d D / d q_i
    return value, q * (h - (q * h).sum(1, keepdim=True))


def _chunk_terms(s_h: Tensor, s_w: Tensor, t_h: Tensor, t_w: Tensor, targets: Tensor, ignore_index: int,
                 temperature: float, divergence: str, need_grad: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """One chunk: per-row cross-entropy and divergence (rows,) (0 on ignored rows) and, with
    ``need_grad``, their gradients with respect to the student's logits (rows, V) each, 0 on
    ignored rows (the divergence's with respect to z_s, i.e. already divided by T)."""
    dtype = _compute_dtype(s_h)
    z_s = (s_h @ s_w.t()).to(dtype)
    z_t = (t_h @ t_w.t()).to(dtype)
    counted = targets != ignore_index
    safe = torch.where(counted, targets, 0)[:, None]
    log_probs = torch.log_softmax(z_s, dim=1)
    ce = torch.where(counted, -log_probs.gather(1, safe)[:, 0], 0.0)
    log_q = log_probs if temperature == 1.0 else torch.log_softmax(z_s / temperature, dim=1)
    log_p = torch.log_softmax(z_t / temperature, dim=1)
    div, d_div = _divergence(log_p, log_q, divergence)
    div = torch.where(counted, div, 0.0)
    if not need_grad:
        return ce, div, None, None
    d_ce = log_probs.exp()
    d_ce.scatter_add_(1, safe, -torch.ones_like(safe, dtype=dtype))
    keep = counted[:, None].to(dtype)
    return ce, div, d_ce * keep, d_div * (keep / temperature)


def _chunk_rows(n: int, v: int, chunk: int | None) -> int:
    if chunk is not None:
        return chunk
    return max(1, min(n, _CHUNK_BYTES // (2 * 4 * v)))


def _forward_sums(s_h, s_w, t_h, t_w, targets, ignore_index, temperature, divergence, rows) -> tuple[Tensor, Tensor]:
    """Sums over the rows of the cross-entropy and of the divergence, chunk by chunk."""
    ce_sum = torch.zeros((), dtype=_compute_dtype(s_h), device=s_h.device)
    div_sum = torch.zeros_like(ce_sum)
    for start in range(0, s_h.shape[0], rows):
        end = start + rows
        ce, div, _, _ = _chunk_terms(s_h[start:end], s_w, t_h[start:end], t_w, targets[start:end], ignore_index,
                                     temperature, divergence, need_grad=False)
        ce_sum += ce.sum()
        div_sum += div.sum()
    return ce_sum, div_sum


class _DistillLoss(torch.autograd.Function):
    """Forward: the loss only. Backward: each chunk's logits again, their gradient, and the
    matmuls into the student's hidden states and head."""

    @staticmethod
    def forward(ctx, s_h, s_w, t_h, t_w, targets, alpha, temperature, divergence, ignore_index, rows):
        counted = (targets != ignore_index).sum()
        ce_sum, div_sum = _forward_sums(s_h, s_w, t_h, t_w, targets, ignore_index, temperature, divergence, rows)
        ctx.save_for_backward(s_h, s_w, t_h, t_w, targets, counted)
        ctx.args = (alpha, temperature, divergence, ignore_index, rows)
        return _mix(ce_sum, div_sum, counted, alpha, temperature)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        s_h, s_w, t_h, t_w, targets, counted = ctx.saved_tensors
        alpha, temperature, divergence, ignore_index, rows = ctx.args
        need_h, need_w = ctx.needs_input_grad[:2]
        dtype = _compute_dtype(s_h)
        scale = grad_output.to(dtype) / counted
        ce_weight, div_weight = scale * alpha, scale * (1.0 - alpha) * temperature ** 2
        grad_h = torch.empty_like(s_h) if need_h else None
        grad_w = torch.zeros(s_w.shape, dtype=dtype, device=s_w.device) if need_w else None
        for start in range(0, s_h.shape[0], rows):
            end = start + rows
            _, _, d_ce, d_div = _chunk_terms(s_h[start:end], s_w, t_h[start:end], t_w, targets[start:end],
                                             ignore_index, temperature, divergence, need_grad=True)
            dlogits = d_ce.mul_(ce_weight).add_(d_div.mul_(div_weight))  # (rows, V) in the compute dtype
            if need_h:
                grad_h[start:end] = (dlogits @ s_w.to(dtype)).to(s_h.dtype)
            if need_w:
                grad_w.addmm_(dlogits.t(), s_h[start:end].to(dtype))
        return (grad_h, None if grad_w is None else grad_w.to(s_w.dtype), *([None] * 8))


def _mix(ce_sum: Tensor, div_sum: Tensor, counted: Tensor, alpha: float, temperature: float) -> Tensor:
    """alpha * mean CE + (1 - alpha) * T^2 * mean divergence over the counted rows (NaN if none)."""
    return (alpha * ce_sum + (1.0 - alpha) * temperature ** 2 * div_sum) / counted


def distill_loss(student_h: Tensor, student_head: Tensor, teacher_h: Tensor, teacher_head: Tensor, targets: Tensor,
                 *, alpha: float = 0.5, temperature: float = 1.0, divergence: str = "forward_kl",
                 ignore_index: int = -100, chunk: int | None = None) -> Tensor:
    """The distillation loss (module docstring) of the student's hidden states ``student_h``
    (N, C) under its head ``student_head`` (V, C) against the teacher's ``teacher_h`` (N, C_t)
    under ``teacher_head`` (V, C_t), with ``targets`` (N,) int64 (``ignore_index`` rows left out
    of both terms). ``chunk``: token rows per chunk (default: ~32 MiB of logits). Returns a
    scalar in fp32 (float64 for float64 students), NaN when no row has a target; differentiable
    in ``student_h`` and ``student_head``. ValueError for a teacher with another vocabulary size.
    """
    _check(student_h, student_head, teacher_h, teacher_head, targets, alpha, temperature, divergence, ignore_index,
           chunk)
    rows = _chunk_rows(student_h.shape[0], student_head.shape[0], chunk)
    t_h, t_w = teacher_h.detach(), teacher_head.detach()
    targets = targets.contiguous()
    if torch.is_grad_enabled() and (student_h.requires_grad or student_head.requires_grad):
        return _DistillLoss.apply(student_h, student_head, t_h, t_w, targets, float(alpha), float(temperature),
                                  divergence, ignore_index, rows)
    counted = (targets != ignore_index).sum()
    ce_sum, div_sum = _forward_sums(student_h, student_head, t_h, t_w, targets, ignore_index, float(temperature),
                                    divergence, rows)
    return _mix(ce_sum, div_sum, counted, float(alpha), float(temperature))


def distill_loss_ref(student_h: Tensor, student_head: Tensor, teacher_h: Tensor, teacher_head: Tensor,
                     targets: Tensor, *, alpha: float = 0.5, temperature: float = 1.0, divergence: str = "forward_kl",
                     ignore_index: int = -100) -> Tensor:
    """``distill_loss`` in plain PyTorch from the full (N, V) logits, differentiated by autograd
    (the teacher detached): the reference the chunked loss is tested against."""
    dtype = _compute_dtype(student_h)
    z_s = (student_h @ student_head.t()).to(dtype)
    z_t = (teacher_h @ teacher_head.t()).detach().to(dtype)
    counted = targets != ignore_index
    ce = F.cross_entropy(z_s, targets, ignore_index=ignore_index, reduction="sum")
    log_q = F.log_softmax(z_s / temperature, dim=1)
    log_p = F.log_softmax(z_t / temperature, dim=1)
    if divergence == "forward_kl":
        per_row = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(1)
    elif divergence == "reverse_kl":
        per_row = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(1)
    elif divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
        per_row = 0.5 * (F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(1)
                         + F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(1))
    else:
        raise ValueError(f"distill_loss_ref: divergence must be one of {DIVERGENCES}, got {divergence!r}")
    div = per_row[counted].sum()
    return (alpha * ce + (1.0 - alpha) * temperature ** 2 * div) / counted.sum()
