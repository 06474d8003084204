"""Vocabulary-parallel cross-entropy (Megatron-LM): each rank holds the logits of its V/tp
vocabulary ids (``tp_slice(V, tp, rank)``: torch.chunk's split, so tp need not divide V) and the
full-vocabulary logits are never gathered.

Per row, two all-reduces over the tensor-parallel group of (N,)-sized values replace the
gather of (N, V) logits: the maximum logit, then the sum of exponentials together with the
target's logit (from the one rank that holds it). The gradient of the logits, softmax - onehot, is then local.

``vocab_parallel_linear_cross_entropy`` also fuses the LM head's matmul, one chunk of rows at a
time (the forward keeps only each row's log-sum-exp; the backward recomputes each chunk's
logits), so no (N, V/tp) logits exist either: the vocabulary-parallel form of
``parallax.ops.linear_cross_entropy``. Softmax and loss are computed in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallax.parallel.state import tp_slice
from parallax.parallel.tensor.comm import all_reduce_, copy_to_region, group_rank, group_size

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

REDUCTIONS = ("mean", "none")
# Rows of logits per chunk in the fused loss: (CHUNK_ROWS, V/tp) fp32 at a time.
CHUNK_ROWS = 1024


def _shard_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, ignore_index: int,
                 group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of logits (rows, V/tp) fp32: the full-vocabulary log-sum-exp and the target's logit."""
    row_max = all_reduce_(logits.max(dim=1).values, group, "all-reduce of the row maxima", dist.ReduceOp.MAX)
    local, mine = _local_targets(targets, vocab_start, logits.size(1), ignore_index)
    target_logit = logits.gather(1, local[:, None])[:, 0].masked_fill(~mine, 0.0)  # only its holder's is nonzero
    sums = torch.stack([torch.exp(logits - row_max[:, None]).sum(dim=1), target_logit])
    all_reduce_(sums, group, "all-reduce of the sums of exponentials and the target logits")
    return row_max + torch.log(sums[0]), sums[1]


def _local_targets(targets: torch.Tensor, vocab_start: int, vocab_local: int,
                   ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into this rank's columns, 0 where not held; whether this rank holds the target)."""
    local = targets - vocab_start
    mine = (targets != ignore_index) & (local >= 0) & (local < vocab_local)
    return local.masked_fill(~mine, 0), mine


def _softmax_minus_onehot(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                          ignore_index: int, row_scale: torch.Tensor) -> torch.Tensor:
    """d loss / d logits (rows, V/tp) fp32 of sum_i row_scale_i * loss_i; 0 on ignored rows."""
    grad = torch.exp(logits - lse[:, None])
    local, mine = _local_targets(targets, vocab_start, logits.size(1), ignore_index)
    grad.scatter_add_(1, local[:, None], -mine[:, None].to(grad.dtype))
    scale = torch.where(targets != ignore_index, row_scale, 0.0)
    return grad.mul_(scale[:, None])


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """logits (N, V/tp) -> loss (N,) fp32, 0 on ignored rows."""

    @staticmethod
    def forward(ctx, logits, targets, group, ignore_index, vocab_start):
        z = logits.float()
        lse, target_logit = _shard_stats(z, targets, vocab_start, ignore_index, group)
        loss = torch.where(targets != ignore_index, lse - target_logit, 0.0)
        ctx.save_for_backward(logits, lse, targets)
        ctx.vocab_start, ctx.ignore_index = vocab_start, ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, targets = ctx.saved_tensors
        grad = _softmax_minus_onehot(logits.float(), lse, targets, ctx.vocab_start, ctx.ignore_index,
                                     grad_loss.float())
        return grad.to(logits.dtype), None, None, None, None


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """h (N, C), weight (V/tp, C) -> loss (N,) fp32, chunked over rows; the gradient of h is this
    rank's partial sum (the caller's ``copy_to_region`` all-reduces it)."""

    @staticmethod
    def forward(ctx, h, weight, targets, group, ignore_index, chunk_rows, vocab_start):
        loss = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
        lse = torch.empty_like(loss)
        for lo in range(0, h.size(0), chunk_rows):
            hi = min(lo + chunk_rows, h.size(0))
            z = (h[lo:hi] @ weight.t()).float()
            lse[lo:hi], target_logit = _shard_stats(z, targets[lo:hi], vocab_start, ignore_index, group)
            loss[lo:hi] = torch.where(targets[lo:hi] != ignore_index, lse[lo:hi] - target_logit, 0.0)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.vocab_start, ctx.ignore_index, ctx.chunk_rows = vocab_start, ignore_index, chunk_rows
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, targets, lse = ctx.saved_tensors
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        row_scale = grad_loss.float().expand(h.size(0))
        for lo in range(0, h.size(0), ctx.chunk_rows):
            hi = min(lo + ctx.chunk_rows, h.size(0))
            z = (h[lo:hi] @ weight.t()).float()
            grad = _softmax_minus_onehot(z, lse[lo:hi], targets[lo:hi], ctx.vocab_start, ctx.ignore_index,
                                         row_scale[lo:hi])
            if grad_h is not None:  # in the weight's dtype: no fp32 copy of the (V/tp, C) weight
                grad_h[lo:hi] = (grad.to(weight.dtype) @ weight).to(h.dtype)
            grad_w.addmm_(grad.t(), h[lo:hi].float())
        grad_w = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None, None


def _check(what: str, x: torch.Tensor, targets: torch.Tensor, reduction: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what}: expected 2-D (N, ...) input; got shape {tuple(x.shape)}")
    if targets.shape != (x.size(0),):
        raise ValueError(f"{what}: targets must have shape (N,) = ({x.size(0)},); got {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{what}: reduction must be one of {REDUCTIONS}; got {reduction!r}")


def _vocab_start(what: str, local: int, vocab_size: int | None, group) -> int:
    """The first vocabulary id of this rank's ``local`` columns: ``tp_slice(vocab_size, tp, rank)``
    (vocab_size None: an even split, tp x local)."""
    tp, rank = group_size(group), group_rank(group)
    full = local * tp if vocab_size is None else vocab_size
    start, end = tp_slice(full, tp, rank)
    if end - start != local:
        raise ValueError(f"{what}: tensor-parallel rank {rank} of {tp} holds {local} vocabulary ids; a vocab_size "
                         f"of {full} split like torch.chunk gives it {end - start}")
    return start


def _reduce(loss: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    return loss.sum() / (targets != ignore_index).sum()  # 0 / 0 = NaN, as F.cross_entropy


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                 group: dist.ProcessGroup | None = None, ignore_index: int = -100,
                                 reduction: str = "mean", vocab_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of logits split over the vocabulary, equal to ``F.cross_entropy`` of the
    full logits.

    logits (N, V/tp): this rank's columns ``tp_slice(V, tp, rank)`` of the (N, V) logits (a
    column-parallel LM head's output); ``vocab_size`` V, needed when tp does not divide it
    (default: tp x this rank's columns); targets (N,) full-vocabulary ids, ``ignore_index`` rows
    left out. Returns the mean over counted rows, or with ``reduction="none"`` (N,) fp32, 0 on
    ignored rows. The same on every rank of ``group``.
    """
    what = "vocab_parallel_cross_entropy"
    _check(what, logits, targets, reduction)
    vocab_start = _vocab_start(what, logits.size(1), vocab_size, group)
    loss = _VocabParallelCrossEntropy.apply(logits, targets, group, ignore_index, vocab_start)
    return _reduce(loss, targets, ignore_index, reduction)


def vocab_parallel_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                        group: dist.ProcessGroup | None = None, ignore_index: int = -100,
                                        reduction: str = "mean", chunk_rows: int = CHUNK_ROWS,
                                        reduce_h_grad: bool = True, vocab_size: int | None = None) -> torch.Tensor:
    """``vocab_parallel_cross_entropy(h @ weight.T, ...)`` without the logits: computed
    ``chunk_rows`` rows at a time, recomputed in backward.

    h (N, C) replicated over ``group``; weight (V/tp, C) this rank's rows ``tp_slice(V, tp, rank)``
    of the LM head (``vocab_size`` V as in ``vocab_parallel_cross_entropy``). Each
    rank's gradient of h is a partial sum (over its vocabulary rows), all-reduced here unless
    ``reduce_h_grad=False`` (h comes from ``gather_from_sequence``, whose backward sums it).
    """
    what = "vocab_parallel_linear_cross_entropy"
    _check(what, h, targets, reduction)
    if weight.dim() != 2 or weight.size(1) != h.size(1):
        raise ValueError(f"{what}: weight must be (V/tp, C = {h.size(1)}); got {tuple(weight.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")
    vocab_start = _vocab_start(what, weight.size(0), vocab_size, group)
    if reduce_h_grad:
        h = copy_to_region(h, group)
    loss = _VocabParallelLinearCrossEntropy.apply(h, weight, targets, group, ignore_index, chunk_rows, vocab_start)
    return _reduce(loss, targets, ignore_index, reduction)
