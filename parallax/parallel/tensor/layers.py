"""Tensor-parallel layers (Megatron-LM): each rank holds one slice of the weight.

``ColumnParallelLinear`` splits the output features (weight rows), ``RowParallelLinear`` the
input features (weight columns), ``VocabParallelEmbedding`` the vocabulary (embedding rows).
Every split follows torch.chunk (``parallax.parallel.state.tp_slice``): a column layer's output
and an embedding's rows need not divide by tp (a vocabulary of 257 byte ids over tp = 2 is split
129 + 128); a row layer's input and fused sections (attention heads) must.
A column layer followed by a row layer (attention's q/k/v then its output projection, an MLP's
up then down projection) needs one all-reduce in forward and one in backward.

With ``sequence_parallel`` the activations outside those pairs are split along the sequence
(B, T/tp, C): a column layer all-gathers its input along the sequence, a row layer and the
embedding reduce-scatter their output instead of all-reducing it.

``from_module`` slices a full ``nn.Linear`` / ``nn.Embedding`` (or Hugging Face's ``Conv1D``,
whose weight is stored (in, out)), copying this rank's slice, so that a model built with the
same seed on every rank holds exactly a single process's weights, only split. It draws no
random numbers (``skip_init``): slices of unequal sizes would otherwise leave the ranks' random
generators apart, and their batches and dropout masks with them. Parameters keep
the names ``weight`` and ``bias``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from parallax.parallel.state import tp_slice
from parallax.parallel.tensor.comm import (copy_to_region, gather_from_region, gather_from_sequence, group_rank,
                                           group_size, reduce_from_region, reduce_scatter_to_sequence,
                                           split_to_region)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "shard_slice", "split_size",
           "split_range"]


def split_size(size: int, tp: int, what: str) -> int:
    """size // tp, or a ValueError naming ``what`` when tp does not divide it."""
    if size % tp:
        raise ValueError(f"{what} = {size} is not divisible by the tensor-parallel degree tp = {tp}")
    return size // tp


def split_range(size: int, tp: int, rank: int, what: str) -> tuple[int, int]:
    """``tp_slice(size, tp, rank)``: this rank's [start, end) of a dimension tp need not divide (a
    vocabulary), or a ValueError naming ``what`` when torch.chunk's split would leave a rank none."""
    chunk = -(-size // tp)
    if (tp - 1) * chunk >= size:
        raise ValueError(f"{what} = {size} is too small to split over tp = {tp}: in chunks of ceil({size} / {tp}) = "
                         f"{chunk} (torch.chunk's split) the last rank would hold none")
    return tp_slice(size, tp, rank)


def _narrow(t: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    start, end = tp_slice(t.size(dim), tp, rank)
    return t.narrow(dim, start, end - start)


def shard_slice(full: torch.Tensor, dim: int, rank: int, tp: int, sections: list[int] | None = None) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full`` along ``dim`` (``tp_slice``: torch.chunk's split), or with
    ``sections`` (a fused q, k, v projection) the concatenation of its slice of each section."""
    parts = full.split(sections, dim) if sections else [full]
    return torch.cat([_narrow(p, dim % full.dim(), rank, tp) for p in parts], dim)


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): y = x @ weight + bias, weight (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, conv1d) of an nn.Linear or a Conv1D."""
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1], True
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    raise TypeError(f"expected an nn.Linear (or Hugging Face Conv1D); got {type(module).__name__}")


class _ParallelLinear(nn.Module):
    """The weight of a tensor-parallel linear layer: (out, in) like nn.Linear, or (in, out) with
    ``conv1d`` (Hugging Face's Conv1D layout, kept so that parameter shapes match its checkpoints)."""

    split_dim_linear: int  # the weight dimension split over ranks in (out, in) layout

    def __init__(self, in_local: int, out_local: int, bias_size: int | None, group, conv1d: bool,
                 sequence_parallel: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.group = group
        self.tp = group_size(group)
        self.conv1d = conv1d
        self.sequence_parallel = sequence_parallel
        shape = (in_local, out_local) if conv1d else (out_local, in_local)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        if bias_size is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.zeros(bias_size, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's; from_module overwrites it

    @property
    def weight_split_dim(self) -> int:
        """The dimension of ``weight`` split over the tensor-parallel ranks."""
        return 1 - self.split_dim_linear if self.conv1d else self.split_dim_linear

    @property
    def full_weight_shape(self) -> tuple[int, int]:
        """The unsplit weight's shape (in this layer's layout)."""
        return (self.in_features, self.out_features) if self.conv1d else (self.out_features, self.in_features)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight.t() if self.conv1d else self.weight, bias)

    @torch.no_grad()
    def _copy_from(self, module: nn.Module, sections: list[int] | None) -> None:
        rank = group_rank(self.group)
        self.weight.copy_(shard_slice(module.weight, self.weight_split_dim, rank, self.tp, sections))
        self.weight.requires_grad_(module.weight.requires_grad)  # a frozen weight stays frozen
        if self.bias is not None:
            column = self.split_dim_linear == 0
            self.bias.copy_(shard_slice(module.bias, 0, rank, self.tp, sections) if column else module.bias)
            self.bias.requires_grad_(module.bias.requires_grad)


class ColumnParallelLinear(_ParallelLinear):
    """y = x W^T + b with W's output features split: this rank computes out_features / tp of them.

    x (..., in_features) replicated (with ``sequence_parallel``: (B, T/tp, in_features), gathered
    along the sequence first) -> (..., out_features / tp), or with ``gather_output`` the full
    (..., out_features). The rank's outputs are ``tp_slice(out_features, tp, rank)``: tp need not
    divide out_features (an LM head over a vocabulary of 257). ``sections``: the output is several
    projections side by side (a fused q, k, v), each split evenly by ranks (a rank holds its heads
    of q, of k and of v).
    """

    split_dim_linear = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group: dist.ProcessGroup | None = None, gather_output: bool = False,
                 sequence_parallel: bool = False, sections: list[int] | None = None, conv1d: bool = False,
                 device=None, dtype=None) -> None:
        tp = group_size(group)
        sections = list(sections) if sections else None
        if sections is not None and sum(sections) != out_features:
            raise ValueError(f"sections {sections} must add up to out_features = {out_features}")
        if sections is None:
            start, end = split_range(out_features, tp, group_rank(group), "out_features")
            out_local = end - start
        else:
            out_local = sum(split_size(size, tp, f"section {i} of out_features") for i, size in enumerate(sections))
        super().__init__(in_features, out_local, out_local if bias else None, group, conv1d, sequence_parallel,
                         device, dtype)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        self.sections = sections

    @classmethod
    def from_module(cls, module: nn.Module, group: dist.ProcessGroup | None, gather_output: bool = False,
                    sequence_parallel: bool = False, sections: list[int] | None = None) -> "ColumnParallelLinear":
        """This rank's slice of a full nn.Linear (or Conv1D), weights copied."""
        in_features, out_features, conv1d = _linear_shape(module)
        w = module.weight
        layer = skip_init(cls, in_features, out_features, module.bias is not None, group, gather_output,
                          sequence_parallel, sections, conv1d, device=w.device, dtype=w.dtype)
        layer._copy_from(module, sections)
        return layer

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """x entering the tensor-parallel region: all-gathered along the sequence (sequence
        parallel), else marked for the all-reduce of its gradient. Column layers that read the
        same x (q, k and v; gate and up) can share one: ``x = first.enter(x)``, then call each
        with ``input_entered=True``."""
        return gather_from_sequence(x, self.group) if self.sequence_parallel else copy_to_region(x, self.group)

    def forward(self, x: torch.Tensor, input_entered: bool = False) -> torch.Tensor:
        """x (..., in) -> (..., out / tp), or (..., out) with gather_output."""
        if not input_entered:
            x = self.enter(x)
        y = self._matmul(x, self.bias)
        return gather_from_region(y, -1, self.group, self.out_features) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} / tp={self.tp}, "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}" + (f", sections={self.sections}" if self.sections else ""))


class RowParallelLinear(_ParallelLinear):
    """y = x W^T + b with W's input features split: this rank multiplies its in_features / tp
    columns and the partial products are summed over ranks (with ``sequence_parallel``:
    reduce-scattered along the sequence). The bias is replicated and added once, after the sum.

    x (..., in_features / tp) (``input_is_parallel``; else the full x, split here) -> (..., out)
    (with ``sequence_parallel``: (B, T/tp, out)).
    """

    split_dim_linear = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group: dist.ProcessGroup | None = None, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, conv1d: bool = False, device=None, dtype=None) -> None:
        tp = group_size(group)
        in_local = split_size(in_features, tp, "in_features")
        super().__init__(in_local, out_features, out_features if bias else None, group, conv1d, sequence_parallel,
                         device, dtype)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel

    @classmethod
    def from_module(cls, module: nn.Module, group: dist.ProcessGroup | None, input_is_parallel: bool = True,
                    sequence_parallel: bool = False) -> "RowParallelLinear":
        """This rank's slice of a full nn.Linear (or Conv1D), weights copied."""
        in_features, out_features, conv1d = _linear_shape(module)
        w = module.weight
        layer = skip_init(cls, in_features, out_features, module.bias is not None, group, input_is_parallel,
                          sequence_parallel, conv1d, device=w.device, dtype=w.dtype)
        layer._copy_from(module, None)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in / tp) -> (..., out)."""
        if not self.input_is_parallel:
            x = split_to_region(x, -1, self.group)
        partial = self._matmul(x, None)
        y = reduce_scatter_to_sequence(partial, self.group) if self.sequence_parallel \
            else reduce_from_region(partial, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} / tp={self.tp}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary) are split: this rank holds ids
    [vocab_start, vocab_end) = ``tp_slice(num_embeddings, tp, rank)`` (torch.chunk's split: tp need
    not divide the vocabulary). Each rank looks up the ids it holds (zeros for the others) and the
    results are summed over ranks (with ``sequence_parallel``: reduce-scattered along the sequence).

    idx (B, T) -> (B, T, dim) (with ``sequence_parallel``: (B, T/tp, dim)).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: dist.ProcessGroup | None = None,
                 sequence_parallel: bool = False, padding_idx: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.padding_idx = padding_idx  # a full-vocabulary id whose row gets no gradient (nn.Embedding's)
        self.group = group
        self.tp = group_size(group)
        self.sequence_parallel = sequence_parallel
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start, self.vocab_end = split_range(num_embeddings, self.tp, group_rank(group),
                                                       "the vocabulary size (num_embeddings)")
        self.weight = nn.Parameter(torch.empty((self.vocab_end - self.vocab_start, embedding_dim), device=device,
                                               dtype=dtype))
        nn.init.normal_(self.weight)

    @classmethod
    def from_module(cls, module: nn.Embedding, group: dist.ProcessGroup | None,
                    sequence_parallel: bool = False) -> "VocabParallelEmbedding":
        """This rank's rows of a full nn.Embedding, copied."""
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"expected an nn.Embedding; got {type(module).__name__}")
        w = module.weight
        layer = skip_init(cls, module.num_embeddings, module.embedding_dim, group, sequence_parallel,
                          module.padding_idx, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(shard_slice(w, 0, group_rank(group), layer.tp))
        layer.weight.requires_grad_(w.requires_grad)
        return layer

    @property
    def weight_split_dim(self) -> int:
        return 0

    @property
    def full_weight_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> (B, T, dim), or (B, T/tp, dim) with sequence_parallel."""
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)
        local = (idx - self.vocab_start).masked_fill(outside, 0)
        pad = self.padding_idx
        local_pad = pad - self.vocab_start if pad is not None and self.vocab_start <= pad < self.vocab_end else None
        partial = F.embedding(local, self.weight, local_pad).masked_fill(outside[..., None], 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(partial, self.group)
        return reduce_from_region(partial, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} / tp={self.tp} (ids {self.vocab_start}..{self.vocab_end - 1}), "
                f"{self.embedding_dim}, sequence_parallel={self.sequence_parallel}")
