"""Low-rank factorization: each target linear layer ``W`` (out, in) becomes two thin layers,
``x -> up(down(x)) + bias`` with ``down`` (rank, in) and ``up`` (out, rank), from its truncated SVD
``W ~ U_r S_r V_r^T``, split evenly: ``up = U_r sqrt(S_r)``, ``down = sqrt(S_r) V_r^T`` (both
factors on the same scale, which suits recovery fine-tuning and later quantization).

The rank of each layer is chosen by one of:

* ``energy`` (default 0.9): the smallest r whose singular values keep that share of the squared
  Frobenius norm, ``sum_{i<r} s_i^2 >= energy * sum_i s_i^2``, per layer;
* ``budget=f``: one global parameter budget: singular values of every target layer are taken in
  order of their energy share (``s_i^2 / sum_j s_j^2`` of their layer) while the target layers
  then hold at most ``f`` of their dense parameters;
* ``rank=r``: the same rank for every layer.

A layer whose rank would not save parameters (``r * (in + out) >= in * out``) stays dense (and
costs its dense size in the budget). The factors are ``nn.Linear`` modules, so they train (recovery
fine-tuning), and quantization or pruning applied afterwards acts on them.
"""

from __future__ import annotations

import heapq
import logging
from typing import Any

import torch
from torch import nn

from parallax.compress.common import FilterFn, register_module, set_module, target_linears

__all__ = ["LowRankLinear", "low_rank"]

logger = logging.getLogger(__name__)


@register_module
class LowRankLinear(nn.Module):
    """``up(down(x))`` (+ up's bias): x (..., in_features) -> (..., out_features) through rank
    ``rank``; ``down.weight`` (rank, in_features), ``up.weight`` (out_features, rank), ``up.bias``
    (out_features,) when ``bias``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LowRankLinear: {name} must be a positive int, got {value!r}")
        if rank > min(in_features, out_features):
            raise ValueError(f"LowRankLinear: rank={rank} is above min(in_features, out_features) = "
                             f"{min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, *, svd: tuple[torch.Tensor, ...] | None = None
                    ) -> "LowRankLinear":
        """The rank-``rank`` truncated SVD of ``linear`` (its ``torch.linalg.svd`` in float32 or
        float64, given as ``svd`` when already computed), in the layer's dtype and device."""
        weight = linear.weight
        u, s, vh = svd if svd is not None else _svd(weight)
        module = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, device=weight.device,
                     dtype=weight.dtype)
        root = s[:rank].sqrt()
        with torch.no_grad():
            module.up.weight.copy_(u[:, :rank] * root)
            module.down.weight.copy_(root[:, None] * vh[:rank])
            if linear.bias is not None:
                module.up.bias.copy_(linear.bias)
        for param in module.parameters():
            param.requires_grad_(weight.requires_grad)
        return module

    def spec(self) -> dict[str, Any]:
        """JSON-able arguments that rebuild this layer empty (``from_spec``)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.up.bias is not None, "dtype": str(self.up.weight.dtype).removeprefix("torch.")}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "LowRankLinear":
        fields = dict(spec)
        dtype = getattr(torch, fields.pop("dtype"))
        return cls(**fields, dtype=dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, k), S (k,), V^T (k, in) of ``weight`` in float32 (float64 kept as is)."""
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    return torch.linalg.svd(w, full_matrices=False)


def _saves(rank: int, linear: nn.Linear) -> bool:
    return rank * (linear.in_features + linear.out_features) < linear.in_features * linear.out_features


def _energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest r with ``sum_{i<r} s_i^2 >= energy * sum s_i^2`` (relative slack 1e-9 for rounding)."""
    share = (s.double() ** 2).cumsum(0)
    total = float(share[-1])
    if total == 0.0:
        return 1
    return min(int((share < energy * total * (1 - 1e-9)).sum()) + 1, s.numel())


def _budget_ranks(spectra: list[torch.Tensor], layers: list[nn.Linear], budget: float, min_rank: int) -> list[int]:
    """Ranks that keep the singular values of highest energy share across all layers while the
    layers hold at most ``budget`` of their dense parameters (a layer whose rank saves nothing
    counts at its dense size). Greedy over every layer's next singular value; a layer whose next
    one no longer fits takes no more."""
    def cost(i: int, r: int) -> int:
        layer = layers[i]
        return r * (layer.in_features + layer.out_features) if _saves(r, layer) else layer.weight.numel()

    ranks = [min(min_rank, s.numel()) for s in spectra]
    left = budget * sum(layer.weight.numel() for layer in layers) - sum(cost(i, r) for i, r in enumerate(ranks))
    if left < 0:
        raise ValueError(f"budget={budget}: the target layers at min_rank={min_rank} already hold more than "
                         f"that share of their parameters; raise budget or lower min_rank")
    shares = [(s.double() ** 2) / max(float((s.double() ** 2).sum()), 1e-300) for s in spectra]
    heap = [(-float(shares[i][r]), i) for i, r in enumerate(ranks) if r < spectra[i].numel()]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        extra = cost(i, ranks[i] + 1) - cost(i, ranks[i])
        if extra > left:
            continue  # this layer is done: its later singular values carry less energy
        left -= extra
        ranks[i] += 1
        if ranks[i] < spectra[i].numel():
            heapq.heappush(heap, (-float(shares[i][ranks[i]]), i))
    return ranks


def _check_args(energy: float, budget: float | None, rank: int | None, min_rank: int) -> None:
    if budget is not None and rank is not None:
        raise ValueError("low_rank: give budget or rank, not both")
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"energy must be a number in (0, 1], got {energy!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0 < budget < 1):
        raise ValueError(f"budget must be a number in (0, 1) (the share of the target layers' parameters kept), "
                         f"got {budget!r}")
    for name, value in (("rank", rank), ("min_rank", min_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def low_rank(model: nn.Module, energy: float = 0.9, *, budget: float | None = None, rank: int | None = None,
             filter_fn: FilterFn | None = None, min_rank: int = 1) -> nn.Module:
    """Replace every target linear layer (``px.compress.target_linears``: all but the LM head,
    filtered by ``filter_fn(module, fqn)``) with a ``LowRankLinear`` from its truncated SVD, in place;
    returns ``model``.

    The rank per layer: ``energy`` (in (0, 1]) of its squared singular values; or, with ``budget``
    (in (0, 1)), a global parameter budget as a share of the target layers' parameters; or ``rank``
    for every layer (at most min(in, out) of each). ``min_rank``: the lowest rank any layer gets.
    A layer whose rank saves no parameters stays dense. The chosen ranks are logged.
    """
    _check_args(energy, budget, rank, min_rank)
    targets = target_linears(model, filter_fn)
    if rank is not None:
        for fqn, layer in targets:
            if rank > min(layer.in_features, layer.out_features):
                raise ValueError(f"rank={rank} is above min(in, out) = {min(layer.in_features, layer.out_features)} "
                                 f"of {fqn} ({layer.out_features} x {layer.in_features})")
    svds = [_svd(layer.weight) for _, layer in targets]
    spectra = [s for _, s, _ in svds]
    if budget is not None:
        ranks = _budget_ranks(spectra, [layer for _, layer in targets], budget, min_rank)
    elif rank is not None:
        ranks = [rank] * len(targets)
    else:
        ranks = [min(max(_energy_rank(s, energy), min_rank), s.numel()) for s in spectra]
    before = after = 0
    for (fqn, layer), r, svd in zip(targets, ranks, svds):
        before += layer.weight.numel()
        kept = float((svd[1][:r].double() ** 2).sum() / (svd[1].double() ** 2).sum().clamp_min(1e-300))
        if _saves(r, layer):
            set_module(model, fqn, LowRankLinear.from_linear(layer, r, svd=svd))
            after += r * (layer.in_features + layer.out_features)
            logger.info("low_rank: %s (%d x %d): rank %d, energy %.4f", fqn, layer.out_features, layer.in_features,
                        r, kept)
        else:
            after += layer.weight.numel()
            logger.info("low_rank: %s (%d x %d): rank %d saves no parameters, kept dense", fqn, layer.out_features,
                        layer.in_features, r)
    logger.info("low_rank: %d target layers, weights %d -> %d parameters (%.3f)", len(targets), before, after,
                after / max(before, 1))
    return model
