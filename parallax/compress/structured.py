"""Structured pruning: remove whole MLP channels (and, for the Llama family, whole key/value head
groups) so the model becomes a smaller regular model of its family, with ``model.config`` updated.

Importance, from one pass over calibration data: channel j of an MLP writes W_down[:, j] * x_j
into the residual stream, so the norm of everything it writes over the calibration tokens is
exactly ||W_down[:, j]||_2 * ||X_j||_2 (X_j: its activation at every token), the error removing it
alone adds to the block's output (a Wanda-style score, per channel instead of per weight). A head
is scored by the sum of its output-projection columns' squared contributions, a key/value group by
the sum over its query heads. Each layer keeps its own most important channels (groups), the same
number in every layer, so one config describes the result.

Counts: the MLP keeps the multiple of ``round_to`` nearest to (1 - sparsity) * width (round_to=8
keeps matmul shapes friendly to vector units); attention removes round(sparsity * groups) whole
key/value groups, each with its query heads, so n_head stays a multiple of n_kv_head and the head
width is unchanged (GQA keeps its ratio). GPT-2 heads are not removed: its config derives the head
width from n_embd // n_head, and Hugging Face's GPT-2 cannot describe narrower attention.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from parallax.compress.activations import input_sq_norms
from parallax.compress.unstructured import lowest_k_mask, prune_count

TARGETS = ("mlp", "heads")


@dataclass(frozen=True)
class Layout:
    """Where a family keeps what structured pruning slices (names relative to one block)."""

    blocks: str  # the ModuleList of blocks, relative to the model
    mlp_in: tuple[str, ...]  # linears whose output rows are the MLP channels
    mlp_out: str  # the linear whose input columns are the MLP channels
    mlp_width: str  # the config field of the MLP width
    attn_q: str | None = None  # q/k/v/o projections; None: heads cannot be removed
    attn_kv: tuple[str, ...] = ()
    attn_out: str | None = None


GPT_LAYOUT = Layout("transformer.h", ("mlp.c_fc",), "mlp.c_proj", "n_inner")
LLAMA_LAYOUT = Layout("model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size",
                      "self_attn.q_proj", ("self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj")


def layout_of(model: nn.Module) -> Layout:
    """The family layout of a parallax GPT or Llama; ValueError for anything else."""
    from parallax.models import GPT, Llama

    if isinstance(model, GPT):
        return GPT_LAYOUT
    if isinstance(model, Llama):
        return LLAMA_LAYOUT
    raise ValueError(f"method 'structured' needs a parallax GPT or Llama model (its config is rewritten); "
                     f"got {type(model).__name__}")


def kept_count(sparsity: float, width: int, round_to: int) -> int:
    """Channels kept of ``width``: the multiple of ``round_to`` nearest to (1 - sparsity) * width."""
    keep = round_to * math.floor((1 - sparsity) * width / round_to + 0.5)
    if not 0 < keep < width:
        raise ValueError(f"sparsity={sparsity} of {width} MLP channels with round_to={round_to} keeps {keep}; "
                         f"it must keep at least one and remove at least one")
    return keep


def kept_sorted(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Ascending indices of the ``keep`` highest ``scores`` (1-D); ties drop the lower index first."""
    removed = lowest_k_mask(scores[None], scores.numel() - keep)[0]
    return (~removed).nonzero().squeeze(1)


@torch.no_grad()
def prune_structured(model: nn.Module, sparsity: float, calib: torch.Tensor, *, targets: tuple[str, ...],
                     round_to: int, batch_size: int) -> None:
    """Remove the least important MLP channels (and key/value groups with their heads) in place;
    ``model.config`` becomes the smaller shape. See the module docstring."""
    layout = layout_of(model)
    if "heads" in targets and layout.attn_out is None:
        raise ValueError(f"targets: 'heads' is not supported for {type(model).__name__} (its head width is "
                         f"n_embd // n_head); use targets=('mlp',)")
    blocks: nn.ModuleList = model.get_submodule(layout.blocks)
    observed = {}
    for i, block in enumerate(blocks):
        if "mlp" in targets:
            observed[f"{i}.mlp"] = block.get_submodule(layout.mlp_out)
        if "heads" in targets:
            observed[f"{i}.heads"] = block.get_submodule(layout.attn_out)
    sq_norms = input_sq_norms(model, observed, calib, batch_size=batch_size)
    config = model.config
    changes: dict[str, int] = {}
    if "mlp" in targets:
        changes[layout.mlp_width] = kept_count(sparsity, blocks[0].get_submodule(layout.mlp_out).in_features, round_to)
    if "heads" in targets:
        changes.update(kept_heads(config, sparsity))
    new_config = dataclasses.replace(config, **changes)
    for i, block in enumerate(blocks):
        state = block.state_dict()
        if "mlp" in targets:
            keep = kept_sorted(contribution(observed[f"{i}.mlp"], sq_norms[f"{i}.mlp"]), changes[layout.mlp_width])
            slice_linears(state, layout.mlp_in, layout.mlp_out, keep)
        if "heads" in targets:
            slice_heads(state, layout, config, new_config, contribution(observed[f"{i}.heads"], sq_norms[f"{i}.heads"]))
        blocks[i] = rebuilt(block, new_config, state)
    model.config = new_config


def contribution(linear: nn.Linear, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """(in,) squared norm of what each input column of ``linear`` writes over the calibration tokens:
    ||W[:, j]||^2 * sum_t x_j(t)^2."""
    return linear.weight.detach().float().pow(2).sum(dim=0) * input_sq_norm


def kept_heads(config, sparsity: float) -> dict[str, int]:
    """The new n_head / n_kv_head (and the fixed head_dim) after removing round(sparsity * groups)
    key/value groups."""
    groups = config.kv_heads
    removed = prune_count(sparsity, groups)
    if not 0 < removed < groups:
        raise ValueError(f"sparsity={sparsity} of {groups} key/value head groups removes {removed}; it must "
                         f"remove at least one and keep at least one")
    per_group = config.n_head // groups
    return {"n_kv_head": groups - removed, "n_head": (groups - removed) * per_group, "head_dim": config.head_dim}


def slice_heads(state: dict[str, torch.Tensor], layout: Layout, config, new_config,
                column_scores: torch.Tensor) -> None:
    """Keep the most important key/value groups (with their query heads) in ``state``;
    ``column_scores`` (n_head * head_dim,) per input column of the output projection."""
    D, per_group = config.head_dim, config.n_head // config.kv_heads
    group_scores = column_scores.view(config.kv_heads, per_group * D).sum(dim=1)  # (groups,)
    groups = kept_sorted(group_scores, new_config.kv_heads)
    kv_rows = (groups[:, None] * D + torch.arange(D)).reshape(-1)
    heads = (groups[:, None] * per_group + torch.arange(per_group)).reshape(-1)
    q_rows = (heads[:, None] * D + torch.arange(D)).reshape(-1)
    slice_linears(state, (layout.attn_q,), layout.attn_out, q_rows)
    slice_linears(state, layout.attn_kv, None, kv_rows)


def slice_linears(state: dict[str, torch.Tensor], row_sliced: tuple[str, ...], column_sliced: str | None,
                  keep: torch.Tensor) -> None:
    """Keep output rows ``keep`` (and their biases) of ``row_sliced`` and input columns ``keep`` of
    ``column_sliced`` in a block's ``state``."""
    for name in row_sliced:
        for key in (f"{name}.weight", f"{name}.bias"):
            if key in state:
                state[key] = state[key].index_select(0, keep.to(state[key].device))
    if column_sliced is not None:
        key = f"{column_sliced}.weight"
        state[key] = state[key].index_select(1, keep.to(state[key].device))


def rebuilt(block: nn.Module, config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new block of ``block``'s class for ``config``, on its device and dtype, holding ``state``."""
    weight = next(block.parameters())
    with torch.device(weight.device):
        new = type(block)(config)
    new.to(weight.dtype).load_state_dict(state)
    return new.train(block.training)
