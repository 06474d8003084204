"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize a linear layer's weight column by column, each column's rounding error
spread over the columns not yet quantized through the inverse Hessian of the layer-output error
``H = 2 X^T X`` (X: the layer's calibration inputs), so ``||X W^T - X W_q^T||`` stays small.

``gptq_weight`` is the per-layer solver (the paper's Algorithm 1 with its lazy batch updates);
``gptq_model`` runs it block by block over a transformer: the calibration inputs of block i are
the outputs of blocks 0 .. i-1 *already quantized*, so each block compensates the error of the
ones before it.

Grids: the shared RTN grids (``quant_linear``). An int4 group's scale and zero are chosen when
quantization reaches the group's first column, from the weights as the earlier columns' errors
left them. With ``act_order`` (columns in order of decreasing Hessian diagonal) the storage,
which has no per-column group index, keeps groups of consecutive columns, so the group grids
are chosen up front from the original weights (AutoGPTQ's ``static_groups``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from parallax.compress.common import set_module
from parallax.compress.quant_linear import QuantLinear, dequantize_codes, int4_grid, int8_scales, quantize_codes
from parallax.ops.quant_linear import pack_int4

__all__ = ["gptq_weight", "gptq_model", "HessianAccumulator", "repeated_blocks"]

log = logging.getLogger(__name__)

LAZY_BATCH = 128  # columns whose updates to the rest of the matrix are applied at once (the paper's B)
CALIB_BATCH = 8  # calibration sequences per forward pass


class HessianAccumulator:
    """A forward hook summing ``2 x^T x`` over the rows of a linear layer's inputs (..., K)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach().reshape(-1, self.sum.shape[0]).float()
        self.sum.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """(K, K) ``2 X^T X / rows`` (the mean, so damping is relative to the data's scale)."""
        return self.sum * (2.0 / max(self.rows, 1))


@torch.no_grad()
def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None,
                dtype: torch.dtype, *, damp: float = 0.01, act_order: bool = False) -> dict[str, torch.Tensor]:
    """GPTQ of an (N, K) weight given its (K, K) Hessian: the QuantLinear buffers {qweight, scales[, zeros]}
    (scales/zeros in ``dtype``). ``damp``: added to the Hessian's diagonal, as a fraction of its mean.
    Raises ValueError when the damped Hessian is not positive definite (a larger damp helps)."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    k = W.shape[1]
    dead = H.diagonal() == 0  # inputs that were always 0: their columns cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    grid = _ColumnGrid(W, bits, group_size, dtype, static=act_order)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(k, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = _upper_cholesky_of_inverse(H)
    codes = torch.zeros_like(W)
    lazy = group_size * max(1, LAZY_BATCH // group_size) if bits == 4 else LAZY_BATCH  # groups never straddle
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            column = int(perm[i1 + i])
            grid.start_group_if_first(column, W1[:, i:])
            scale, zero = grid.of_column(column)
            w = W1[:, i]
            q = quantize_codes(w, scale, zero)
            codes[:, i1 + i] = q
            err = (w - dequantize_codes(q, scale, zero)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # compensate inside the lazy batch
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the batch's errors, applied to every later column at once
    codes = codes[:, torch.argsort(perm)]
    if bits == 8:
        return {"qweight": codes.to(torch.int8), "scales": grid.scales.to(dtype)}
    return {"qweight": pack_int4(codes.to(torch.uint8)), "scales": grid.scales.to(dtype), "zeros": grid.zeros.to(dtype)}


class _ColumnGrid:
    """The quantization grid per column: int8's per-row scales (fixed up front), or int4's group
    scales/zeros, chosen when a group's first column comes (or all up front when ``static``)."""

    def __init__(self, W: torch.Tensor, bits: int, group_size: int | None, dtype: torch.dtype, static: bool) -> None:
        n, k = W.shape
        self.bits, self.group_size, self.dtype, self.static = bits, group_size, dtype, static
        self.zeros: torch.Tensor | None = None
        if bits == 8:
            self.scales = int8_scales(W, dtype)
        elif static:
            self.scales, self.zeros = int4_grid(W.reshape(n, k // group_size, group_size), dtype)
        else:
            self.scales = torch.ones(n, k // group_size, device=W.device)
            self.zeros = torch.zeros(n, k // group_size, device=W.device)

    def start_group_if_first(self, column: int, rest: torch.Tensor) -> None:
        """``rest``: the current weights of this column and the ones after it, in quantization order."""
        if self.bits == 4 and not self.static and column % self.group_size == 0:
            g = column // self.group_size
            self.scales[:, g], self.zeros[:, g] = int4_grid(rest[:, :self.group_size], self.dtype)

    def of_column(self, column: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.bits == 8:
            return self.scales, None
        g = column // self.group_size
        return self.scales[:, g], self.zeros[:, g]


def _upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """U with U^T U = H^-1 (upper Cholesky factor of the inverse): row i of U holds the
    coefficients that spread column i's error over the later columns."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise ValueError("GPTQ: the damped Hessian is not positive definite; raise damp (e.g. 0.1) or give "
                         "more calibration data")
    return U


def repeated_blocks(model: nn.Module) -> tuple[list[str], list[nn.Module]]:
    """(qualified names, modules) of the model's transformer blocks: the children of its longest
    nn.ModuleList of at least two modules of one class; empty when it has none."""
    best_name, best = "", None
    for name, module in model.named_modules():
        repeated = isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(c) for c in module}) == 1
        if repeated and (best is None or len(module) > len(best)):
            best_name, best = name, module
    if best is None:
        return [], []
    prefix = f"{best_name}." if best_name else ""
    return [f"{prefix}{i}" for i in range(len(best))], list(best)


class _Captured(Exception):
    """Stops the model's forward at the first block once its inputs are recorded."""


@torch.no_grad()
def gptq_model(model: nn.Module, targets: list[tuple[str, nn.Linear]], calib: torch.Tensor, bits: int,
               group_size: int | None, *, damp: float, act_order: bool, activations: str | None) -> None:
    """Replace every target (qualified name, nn.Linear) of ``model`` by its GPTQ QuantLinear, one
    transformer block after another (``calib``: (N, T) token ids). Targets outside the blocks are
    quantized last, from a pass of the whole (by then quantized) model."""
    remaining = dict(targets)
    names, blocks = repeated_blocks(model)
    device = next(model.parameters()).device
    batches = [rows.to(device) for rows in calib.split(CALIB_BATCH)]
    was_training = model.training
    model.eval()
    try:
        inputs = _first_block_inputs(model, blocks[0], batches) if blocks else []
        for index, (prefix, block) in enumerate(zip(names, blocks)):
            layers = {fqn: m for fqn, m in remaining.items() if fqn.startswith(prefix + ".")}
            _quantize_layers(model, layers, functools.partial(_run_block, block, inputs),
                             bits, group_size, damp, act_order, activations)
            for fqn in layers:
                del remaining[fqn]
            if index + 1 < len(blocks):  # the next block sees this (now quantized) block's outputs
                inputs = [((hidden,) + tuple(args[1:]), kwargs)
                          for hidden, (args, kwargs) in zip(_run_block(block, inputs), inputs)]
            log.info("gptq: block %d/%d quantized (%d layers)", index + 1, len(blocks), len(layers))
        if remaining:
            _quantize_layers(model, remaining, lambda: [model(rows) for rows in batches],
                             bits, group_size, damp, act_order, activations)
    finally:
        model.train(was_training)


def _first_block_inputs(model: nn.Module, block: nn.Module, batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the first block receives for each calibration batch."""
    recorded: list[tuple[tuple, dict]] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not args:
            raise ValueError(f"GPTQ: {type(module).__name__} takes its hidden states by keyword; the blocks must "
                             "receive them as the first positional argument")
        recorded.append((args, kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for rows in batches:
            try:
                model(rows)
            except _Captured:
                pass
    finally:
        handle.remove()
    return recorded


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """The block's hidden states for each recorded input (Hugging Face blocks return a tuple that
    starts with them)."""
    outputs = [block(*args, **kwargs) for args, kwargs in inputs]
    return [out[0] if isinstance(out, (tuple, list)) else out for out in outputs]


def _quantize_layers(model: nn.Module, layers: dict[str, nn.Linear], run: Callable[[], object], bits: int,
                     group_size: int | None, damp: float, act_order: bool, activations: str | None) -> None:
    """Accumulate each layer's Hessian over ``run()``, then replace each by its GPTQ QuantLinear."""
    if not layers:
        return
    with _hessian_hooks(layers) as accumulators:
        run()
    for fqn, linear in layers.items():
        try:
            buffers = gptq_weight(linear.weight, accumulators[fqn].hessian(), bits, group_size, linear.weight.dtype,
                                  damp=damp, act_order=act_order)
        except ValueError as error:
            raise ValueError(f"{error} (layer {fqn!r}, damp={damp})") from None
        set_module(model, fqn, QuantLinear.from_linear(linear, bits, group_size, activations, quantized=buffers))


@contextmanager
def _hessian_hooks(layers: dict[str, nn.Linear]) -> Iterator[dict[str, HessianAccumulator]]:
    accumulators = {fqn: HessianAccumulator(m.in_features, m.weight.device) for fqn, m in layers.items()}
    handles = [m.register_forward_hook(accumulators[fqn]) for fqn, m in layers.items()]
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()
