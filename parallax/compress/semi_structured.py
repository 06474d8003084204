"""2:4 semi-structured pruning: in every group of 4 consecutive input weights of a row, keep the 2
highest-scoring (|W|, or Wanda's |W| * ||X|| with calibration data) and zero the other 2.

The masked dense weight is the reference and runs anywhere. With ``accelerate`` the weight of each
pruned linear becomes a ``torch.sparse.to_sparse_semi_structured`` tensor (CUDA, compute capability
8.0+, fp16/bf16), which ``F.linear`` multiplies with the sparse tensor cores; the module stays an
``nn.Linear``, so every forward (training-free inference, the engine) works unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from parallax.compress.unstructured import lowest_k_mask

GROUP, KEEP = 4, 2
SPARSE_DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_supported(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can become a semi-structured sparse tensor here (CUDA sm80+, fp16/bf16)."""
    return (weight.is_cuda and torch.cuda.get_device_capability(weight.device) >= (8, 0)
            and weight.dtype in SPARSE_DTYPES)


def check_groups(linears: dict[str, nn.Linear]) -> None:
    """ValueError naming the first linear whose input features are not a multiple of 4."""
    for fqn, linear in linears.items():
        if linear.in_features % GROUP != 0:
            raise ValueError(f"method '2:4': {fqn} has {linear.in_features} input features, not a multiple of "
                             f"{GROUP}; exclude it with filter_fn")


@torch.no_grad()
def prune_2_4(linears: dict[str, nn.Linear], scores: dict[str, torch.Tensor], *, accelerate: bool) -> None:
    """Zero the 2 lowest-scoring weights of every group of 4 consecutive inputs, in place, then
    (``accelerate``) store each weight as a semi-structured sparse tensor. ``scores``: {fqn: (out, in)}."""
    check_groups(linears)
    for fqn, linear in linears.items():
        groups = scores[fqn].reshape(-1, GROUP)  # (out * in / 4, 4)
        mask = lowest_k_mask(groups, GROUP - KEEP).view_as(linear.weight)
        linear.weight.masked_fill_(mask, 0)
    if accelerate:
        for fqn, linear in linears.items():
            to_semi_structured(fqn, linear)


def to_semi_structured(fqn: str, linear: nn.Linear) -> None:
    """Replace ``linear.weight`` (already 2:4) by its semi-structured sparse form."""
    weight = linear.weight
    if not semi_structured_supported(weight):
        raise ValueError(f"accelerate=True: {fqn} has a {weight.dtype} weight on {weight.device}; semi-structured "
                         f"sparsity needs a CUDA GPU of compute capability 8.0+ and a float16/bfloat16 weight")
    try:
        sparse = torch.sparse.to_sparse_semi_structured(weight.detach())
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"accelerate=True: {fqn} ({tuple(weight.shape)}) cannot be stored semi-structured: {err}; "
                         "exclude it with filter_fn") from err
    linear.weight = nn.Parameter(sparse, requires_grad=False)
