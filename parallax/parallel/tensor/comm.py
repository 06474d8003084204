"""Autograd collectives over a tensor-parallel group: Megatron-LM's conjugate f/g pairs.

Each function is the identity on a group of one rank. ``group=None`` is the world group.

=============================  ==============================  ==============================
function                       forward                         backward
=============================  ==============================  ==============================
``copy_to_region``             identity                        all-reduce
``reduce_from_region``         all-reduce                      identity
``gather_from_region(dim)``    all-gather along dim            keep this rank's slice
``split_to_region(dim)``       keep this rank's slice          all-gather along dim
``scatter_to_sequence``        keep this rank's slice, dim 1   all-gather along dim 1
``gather_from_sequence``       all-gather along dim 1          reduce-scatter along dim 1
``reduce_scatter_to_sequence`` reduce-scatter along dim 1      all-gather along dim 1
=============================  ==============================  ==============================

Collectives go through ``parallax.zero.comm.Comm`` (a deadline and an error naming the
collective instead of a hang when a rank dies).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallax.parallel.state import tp_slice
from parallax.zero.comm import Comm

__all__ = ["copy_to_region", "reduce_from_region", "gather_from_region", "split_to_region",
           "scatter_to_sequence", "gather_from_sequence", "reduce_scatter_to_sequence",
           "all_reduce_", "all_gather_along", "all_gather_slices", "group_rank", "group_size",
           "COLLECTIVE_TIMEOUT_S"]

# How long a tensor-parallel collective may take before it fails with CollectiveError (the
# ZeRO default): a dead peer then gives an error, not a hang.
COLLECTIVE_TIMEOUT_S = 600.0

_comms: dict[object, Comm] = {}


def _comm(group: dist.ProcessGroup | None) -> Comm:
    key = group if group is not None else "world"
    if key not in _comms:
        _comms[key] = Comm(group, COLLECTIVE_TIMEOUT_S)
    return _comms[key]


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def all_reduce_(x: torch.Tensor, group: dist.ProcessGroup | None, what: str,
                op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """x reduced over ``group`` in place (no autograd); returns x. ``what`` names it in errors."""
    if group_size(group) > 1:
        _comm(group).all_reduce(x, f"tensor parallel: {what}", op).wait()
    return x


def _all_reduce(x: torch.Tensor, group, what: str) -> torch.Tensor:
    return all_reduce_(x.contiguous().clone(), group, what)


def all_gather_along(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None, what: str) -> torch.Tensor:
    """Every rank's x concatenated along ``dim`` in rank order (no autograd)."""
    n = group_size(group)
    moved = x.movedim(dim, 0).contiguous()  # the gathered dimension first: rank blocks are contiguous
    out = torch.empty((n * moved.size(0), *moved.shape[1:]), dtype=x.dtype, device=x.device)
    _comm(group).all_gather(out, moved, f"tensor parallel: {what}").wait()
    return out.movedim(0, dim)


def all_gather_slices(x: torch.Tensor, dim: int, size: int, group: dist.ProcessGroup | None,
                      what: str) -> torch.Tensor:
    """The full tensor of a dimension ``dim`` of full size ``size`` that ``group`` holds split like
    torch.chunk (rank r its ``tp_slice(size, tp, r)``, the last slices smaller when tp does not
    divide ``size``): every rank's slice concatenated (no autograd). The shorter slices are padded
    to ceil(size / tp) for the all-gather and the padding trimmed."""
    n, rank = group_size(group), group_rank(group)
    start, end = tp_slice(size, n, rank)
    if x.size(dim) != end - start:
        raise ValueError(f"tensor parallel {what}: rank {rank} of {n} holds {x.size(dim)} of dimension {dim} "
                         f"(shape {tuple(x.shape)}); a full size of {size} split like torch.chunk gives it "
                         f"{end - start}")
    chunk = -(-size // n)
    if x.size(dim) < chunk:
        pad_shape = list(x.shape)
        pad_shape[dim] = chunk - x.size(dim)
        x = torch.cat([x, x.new_zeros(pad_shape)], dim)
    return all_gather_along(x, dim, group, what).narrow(dim, 0, size)


def _reduce_scatter(x: torch.Tensor, dim: int, group, what: str) -> torch.Tensor:
    """This rank's slice along ``dim`` of the sum of every rank's x."""
    n = group_size(group)
    _check_divisible(x, dim, n, what)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.size(0) // n, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    _comm(group).reduce_scatter(out, moved, f"tensor parallel: {what}").wait()
    return out.movedim(0, dim)


def _split(x: torch.Tensor, dim: int, group, what: str) -> torch.Tensor:
    n = group_size(group)
    _check_divisible(x, dim, n, what)
    return x.chunk(n, dim)[group_rank(group)].contiguous()


def _check_divisible(x: torch.Tensor, dim: int, n: int, what: str) -> None:
    if x.size(dim) % n:
        raise ValueError(f"tensor parallel {what}: dimension {dim} of a tensor of shape {tuple(x.shape)} has size "
                         f"{x.size(dim)}, not divisible by the tensor-parallel degree {n}"
                         + (" (sequence parallelism needs a sequence length divisible by tp)" if dim == 1 else ""))


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group, "all-reduce of an input gradient"), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group, "all-reduce of partial outputs")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, size):
        ctx.dim, ctx.group, ctx.size = dim, group, size
        return all_gather_slices(x, dim, size, group, f"all-gather along dim {dim}")

    @staticmethod
    def backward(ctx, grad):
        start, end = tp_slice(ctx.size, group_size(ctx.group), group_rank(ctx.group))
        return grad.narrow(ctx.dim, start, end - start).contiguous(), None, None, None


class _SplitToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group, f"split along dim {dim}")

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, ctx.dim, ctx.group, f"all-gather of a gradient along dim {ctx.dim}"), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_along(x, 1, group, "all-gather along the sequence")

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, 1, ctx.group, "reduce-scatter of a gradient along the sequence"), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, 1, group, "reduce-scatter along the sequence")

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, 1, ctx.group, "all-gather of a gradient along the sequence"), None


def _single(group) -> bool:
    return group_size(group) == 1


def copy_to_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated x: forward identity, backward all-reduce
    (each rank's gradient of x is a partial sum over its slice of the layer)."""
    return x if _single(group) else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Leave a region by summing every rank's partial x: forward all-reduce, backward identity."""
    return x if _single(group) else _ReduceFromRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None,
                       size: int | None = None) -> torch.Tensor:
    """Concatenate every rank's slice of x along ``dim``; backward keeps this rank's slice.

    ``size``: the full size along ``dim`` when tp need not divide it (a vocabulary: rank r holds
    ``tp_slice(size, tp, r)``, torch.chunk's split); default tp x this rank's size (an even split)."""
    if _single(group):
        return x
    dim = dim % x.dim()
    return _GatherFromRegion.apply(x, dim, group, x.size(dim) * group_size(group) if size is None else size)


def split_to_region(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's slice of a replicated x along ``dim``; backward all-gathers."""
    return x if _single(group) else _SplitToRegion.apply(x, dim % x.dim(), group)


def scatter_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(B, T, ...) replicated -> (B, T/tp, ...) this rank's part of the sequence; backward all-gathers."""
    return split_to_region(x, 1, group)


def gather_from_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(B, T/tp, ...) -> (B, T, ...), every rank's part; backward reduce-scatters (the gathered x
    feeds a column-parallel layer, whose gradient of it is a partial sum on each rank)."""
    return x if _single(group) else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(B, T, ...) partial sums -> (B, T/tp, ...) this rank's part of their sum; backward all-gathers."""
    return x if _single(group) else _ReduceScatterToSequence.apply(x, group)
