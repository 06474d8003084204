"""Rank-side code of the tensor-parallelism tests (spawned processes import it)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallax.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                      vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy)
from parallax.parallel.tensor.layers import shard_slice

TOL = dict(rtol=1e-5, atol=1e-6)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, **tol) -> None:
    torch.testing.assert_close(actual, expected, **(tol or TOL), msg=lambda m: f"{what}: {m}")


def _seq_chunk(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world, 1)[rank]


def _run(module: nn.Module, x: torch.Tensor, grad_out_fn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output and input gradient of module(x) under the upstream gradient grad_out_fn(output)."""
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    y = module(x)
    y.backward(grad_out_fn(y))
    return y.detach(), x.grad


def layer_checks(rank: int, world: int) -> None:
    """Every layer against its full plain-PyTorch module: outputs, input gradients and parameter
    gradients (this rank's slice), with odd unsplit sizes, with and without sequence parallelism."""
    torch.manual_seed(0)
    B, T = 3, 2 * world
    g = torch.Generator().manual_seed(1)

    def upstream(shape):
        return torch.randn(shape, generator=torch.Generator().manual_seed(hash(shape) % 1000))

    # Column: 7 inputs, 10 outputs (5 per rank); gathered and sharded output; fused sections.
    for gather, sections in ((True, None), (False, None), (False, [4, 2, 4])):
        full = nn.Linear(7, 10)
        x = torch.randn(B, T, 7, generator=g)
        y_ref, gx_ref = _run(full, x, lambda y: upstream(tuple(y.shape)))
        layer = ColumnParallelLinear.from_module(full, None, gather_output=gather, sections=sections)
        if gather:
            y, gx = _run(layer, x, lambda y: upstream(tuple(y.shape)))
            _close(y, y_ref, "column output")
        else:
            y, gx = _run(layer, x, lambda y: shard_slice(upstream(tuple(y_ref.shape)), -1, rank, world, sections))
            _close(y, shard_slice(y_ref, -1, rank, world, sections), f"column output shard (sections={sections})")
        _close(gx, gx_ref, f"column input grad (gather={gather}, sections={sections})")
        _close(layer.weight.grad, shard_slice(full.weight.grad, 0, rank, world, sections), "column weight grad")
        _close(layer.bias.grad, shard_slice(full.bias.grad, 0, rank, world, sections), "column bias grad")

    # Row: 10 inputs (5 per rank), 7 outputs; split here or already split.
    for parallel_input in (False, True):
        full = nn.Linear(10, 7)
        x = torch.randn(B, T, 10, generator=g)
        y_ref, gx_ref = _run(full, x, lambda y: upstream(tuple(y.shape)))
        layer = RowParallelLinear.from_module(full, None, input_is_parallel=parallel_input)
        x_in = shard_slice(x, -1, rank, world) if parallel_input else x
        y, gx = _run(layer, x_in, lambda y: upstream(tuple(y.shape)))
        _close(y, y_ref, "row output")
        _close(gx, shard_slice(gx_ref, -1, rank, world) if parallel_input else gx_ref, "row input grad")
        _close(layer.weight.grad, shard_slice(full.weight.grad, 1, rank, world), "row weight grad")
        _close(layer.bias.grad, full.bias.grad, "row bias grad")

    # Hugging Face's Conv1D layout (weight (in, out)) as column and row layers.
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(10, 7)
    nn.init.normal_(conv.bias)
    x = torch.randn(B, T, 7, generator=g)
    y_ref, gx_ref = _run(conv, x, lambda y: upstream(tuple(y.shape)))
    layer = ColumnParallelLinear.from_module(conv, None, gather_output=True)
    y, gx = _run(layer, x, lambda y: upstream(tuple(y.shape)))
    _close(y, y_ref, "Conv1D column output")
    _close(gx, gx_ref, "Conv1D column input grad")
    _close(layer.weight.grad, shard_slice(conv.weight.grad, 1, rank, world), "Conv1D column weight grad")
    conv = Conv1D(7, 10)
    x = torch.randn(B, T, 10, generator=g)
    y_ref, gx_ref = _run(conv, x, lambda y: upstream(tuple(y.shape)))
    layer = RowParallelLinear.from_module(conv, None, input_is_parallel=False)
    y, gx = _run(layer, x, lambda y: upstream(tuple(y.shape)))
    _close(y, y_ref, "Conv1D row output")
    _close(gx, gx_ref, "Conv1D row input grad")
    _close(layer.weight.grad, shard_slice(conv.weight.grad, 0, rank, world), "Conv1D row weight grad")

    # Vocabulary-parallel embedding: 10 ids (5 per rank), width 7, every id used.
    full = nn.Embedding(10, 7)
    idx = torch.arange(B * T).remainder(10).view(B, T)
    y_ref, _ = _run(full, idx, lambda y: upstream(tuple(y.shape)))
    layer = VocabParallelEmbedding.from_module(full, None)
    y, _ = _run(layer, idx, lambda y: upstream(tuple(y.shape)))
    _close(y, y_ref, "embedding output")
    _close(layer.weight.grad, shard_slice(full.weight.grad, 0, rank, world), "embedding weight grad")

    _sequence_parallel_checks(rank, world, B, T, g, upstream)


def _sequence_parallel_checks(rank, world, B, T, g, upstream) -> None:
    """Sequence-parallel inputs/outputs are this rank's part of the sequence (B, T/tp, ...); a
    row layer's bias gradient is a partial sum over ranks."""
    full = nn.Linear(7, 10)
    x = torch.randn(B, T, 7, generator=g)
    y_ref, gx_ref = _run(full, x, lambda y: upstream(tuple(y.shape)))
    layer = ColumnParallelLinear.from_module(full, None, sequence_parallel=True)
    y, gx = _run(layer, _seq_chunk(x, rank, world), lambda y: shard_slice(upstream(tuple(y_ref.shape)), -1, rank, world))
    _close(y, shard_slice(y_ref, -1, rank, world), "sequence-parallel column output")
    _close(gx, _seq_chunk(gx_ref, rank, world), "sequence-parallel column input grad")
    _close(layer.weight.grad, shard_slice(full.weight.grad, 0, rank, world), "sequence-parallel column weight grad")

    full = nn.Linear(10, 7)
    x = torch.randn(B, T, 10, generator=g)
    y_ref, gx_ref = _run(full, x, lambda y: upstream(tuple(y.shape)))
    layer = RowParallelLinear.from_module(full, None, sequence_parallel=True)
    y, gx = _run(layer, shard_slice(x, -1, rank, world),
                 lambda y: _seq_chunk(upstream(tuple(y_ref.shape)), rank, world))
    _close(y, _seq_chunk(y_ref, rank, world), "sequence-parallel row output")
    _close(gx, shard_slice(gx_ref, -1, rank, world), "sequence-parallel row input grad")
    _close(layer.weight.grad, shard_slice(full.weight.grad, 1, rank, world), "sequence-parallel row weight grad")
    bias_grad = layer.bias.grad.clone()
    dist.all_reduce(bias_grad)
    _close(bias_grad, full.bias.grad, "sequence-parallel row bias grad summed over ranks")

    full = nn.Embedding(10, 7)
    idx = torch.arange(B * T).remainder(10).view(B, T)
    y_ref, _ = _run(full, idx, lambda y: upstream(tuple(y.shape)))
    layer = VocabParallelEmbedding.from_module(full, None, sequence_parallel=True)
    y, _ = _run(layer, idx, lambda y: _seq_chunk(upstream(tuple(y_ref.shape)), rank, world))
    _close(y, _seq_chunk(y_ref, rank, world), "sequence-parallel embedding output")
    _close(layer.weight.grad, shard_slice(full.weight.grad, 0, rank, world), "sequence-parallel embedding grad")


def cross_entropy_checks(rank: int, world: int) -> None:
    """Both vocabulary-parallel losses against F.cross_entropy on the full logits: loss (mean and
    per row, ignored rows included) and the gradients of the logits / of h and the weight."""
    N, C, V = 13, 6, 11 * world
    g = torch.Generator().manual_seed(2)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[2, 7]] = -100
    logits = (3 * torch.randn(N, V, generator=g)).requires_grad_()
    row_weights = torch.rand(N, generator=g)
    for reduction in ("mean", "none"):
        ref = F.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)
        (ref if reduction == "mean" else (ref * row_weights).sum()).backward()
        shard = shard_slice(logits.detach(), 1, rank, world).requires_grad_()
        loss = vocab_parallel_cross_entropy(shard, targets, None, reduction=reduction)
        (loss if reduction == "mean" else (loss * row_weights).sum()).backward()
        _close(loss, ref.detach(), f"vocab-parallel cross-entropy ({reduction})")
        _close(shard.grad, shard_slice(logits.grad, 1, rank, world), f"vocab-parallel logits grad ({reduction})")
        logits.grad = None

    h = torch.randn(N, C, generator=g, requires_grad=True)
    weight = torch.randn(V, C, generator=g, requires_grad=True)
    for reduction in ("mean", "none"):
        ref = F.cross_entropy(h @ weight.t(), targets, ignore_index=-100, reduction=reduction)
        (ref if reduction == "mean" else (ref * row_weights).sum()).backward()
        h_tp = h.detach().clone().requires_grad_()
        w_tp = shard_slice(weight.detach(), 0, rank, world).requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(h_tp, w_tp, targets, None, reduction=reduction, chunk_rows=4)
        (loss if reduction == "mean" else (loss * row_weights).sum()).backward()
        _close(loss, ref.detach(), f"fused vocab-parallel cross-entropy ({reduction})")
        _close(h_tp.grad, h.grad, f"fused vocab-parallel grad of h ({reduction})")
        _close(w_tp.grad, shard_slice(weight.grad, 0, rank, world), f"fused vocab-parallel weight grad ({reduction})")
        h.grad = weight.grad = None
