"""``px.compress.quantize``: weight-only int8 / int4 quantization of a model's linear layers, in place.

    px.compress.quantize(model, bits=8)                                    # int8 per channel, RTN
    px.compress.quantize(model, bits=4, group_size=128)                    # int4 g128, RTN
    px.compress.quantize(model, bits=4, group_size=128, method="gptq", calib=tokens)   # GPTQ
    px.compress.quantize(model, bits=8, activations="int8")                # W8A8 (dynamic activations)

Each targeted ``nn.Linear`` (``common.target_linears``: all but the output head, minus what
``filter_fn`` excludes) becomes a ``QuantLinear``; the model keeps its class, so training code,
``generate``, ``parallax eval`` and the inference engine run it unchanged.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from parallax.compress.common import FilterFn, check_calibration, set_module, target_linears
from parallax.compress.gptq import gptq_model
from parallax.compress.quant_linear import ACTIVATIONS, BITS, QuantLinear

__all__ = ["quantize", "dequantize", "METHODS", "DEFAULT_INT4_GROUP"]

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq")
DEFAULT_INT4_GROUP = 128
GPTQ_MIN_SAMPLES = 4  # fewer sequences is a mistake, not a setting (AutoGPTQ suggests 128)


def quantize(model: nn.Module, bits: int = 8, group_size: int | None = None, method: str = "rtn",
             calib: torch.Tensor | None = None, *, filter_fn: FilterFn | None = None,
             activations: str | None = None, damp: float = 0.01, act_order: bool = False) -> nn.Module:
    """Quantize ``model``'s linear layers in place and return it.

    bits: 8 (per output channel, symmetric; ``group_size`` must be None) or 4 (groups of
    ``group_size`` input columns, asymmetric with zero points; None means 128).
    method: "rtn" (round to nearest) or "gptq" (needs ``calib``, (N, T) token ids of at least
    4 sequences and as many tokens as the widest layer's input; ``damp``: Hessian dampening as a
    fraction of its mean diagonal; ``act_order``: quantize columns by decreasing activation energy).
    activations: None, or "int8" for dynamic per-token int8 activations (W8A8, bits=8 only,
    inference only).
    Raises ValueError naming the argument (and the layer) for a bad value; the model is unchanged then.
    """
    group_size = _check_arguments(bits, group_size, method, activations, damp, act_order)
    targets = target_linears(model, filter_fn)
    if not targets:
        raise ValueError(f"quantize: no nn.Linear to quantize in {type(model).__name__} (the output head is never "
                         "quantized; did filter_fn exclude every layer?)")
    _check_layers(targets, bits, group_size)
    if method == "gptq":
        calib = check_calibration(calib, method, min_samples=GPTQ_MIN_SAMPLES)
        _check_enough_tokens(calib, targets)
        gptq_model(model, targets, calib, bits, group_size, damp=damp, act_order=act_order, activations=activations)
    else:
        if calib is not None:
            log.info("quantize: method 'rtn' uses no calibration data; calib is ignored")
        for fqn, linear in targets:
            set_module(model, fqn, QuantLinear.from_linear(linear, bits, group_size, activations))
    log.info("quantize: %d linear layers to int%d (%s%s)", len(targets), bits, method,
             f", group_size {group_size}" if group_size else "")
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear of ``model`` (also one under a LoRA layer) by an nn.Linear holding its
    dequantized weight, in place; returns the model. Its outputs are unchanged (W8A8 layers then
    compute in floating point)."""
    replaced = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, QuantLinear)]
    for fqn, layer in replaced:
        set_module(model, fqn, _dense(layer))
    return model


def _dense(layer: QuantLinear) -> nn.Linear:
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.dtype,
                       device=layer.qweight.device)
    with torch.no_grad():
        linear.weight.copy_(layer.dequantized_weight())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear


def _check_arguments(bits: int, group_size: int | None, method: str, activations: str | None, damp: float,
                     act_order: bool) -> int | None:
    """The effective group size, after checking every argument."""
    if bits not in BITS:
        raise ValueError(f"quantize: bits must be one of {BITS}, got {bits!r}")
    if method not in METHODS:
        raise ValueError(f"quantize: method must be one of {METHODS}, got {method!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"quantize: activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations == "int8" and bits != 8:
        raise ValueError(f"quantize: activations='int8' (W8A8) needs bits=8, got bits={bits}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
        raise ValueError(f"quantize: damp must be a positive float (e.g. 0.01), got {damp!r}")
    if not isinstance(act_order, bool):
        raise ValueError(f"quantize: act_order must be a bool, got {act_order!r}")
    if bits == 8:
        if group_size is not None:
            raise ValueError(f"quantize: bits=8 quantizes per output channel, so group_size must be None, "
                             f"got {group_size!r}")
        return None
    if group_size is None:
        return DEFAULT_INT4_GROUP
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"quantize: group_size must be a positive int (e.g. 32, 64, 128) or None, got {group_size!r}")
    return group_size


def _check_layers(targets: list[tuple[str, nn.Linear]], bits: int, group_size: int | None) -> None:
    if bits != 4:
        return
    for fqn, linear in targets:
        k = linear.in_features
        if k % group_size or k % 2:
            raise ValueError(f"quantize: group_size {group_size} does not divide the input features of layer "
                             f"{fqn!r} ({k}; int4 also needs them even); choose a group_size that divides every "
                             "target layer's in_features, or leave the layer out with filter_fn")


def _check_enough_tokens(calib: torch.Tensor, targets: list[tuple[str, nn.Linear]]) -> None:
    """GPTQ's Hessian (K, K) has rank at most the number of calibration tokens: fewer than K leaves
    part of it to the dampening alone."""
    fqn, widest = max(targets, key=lambda target: target[1].in_features)
    if calib.numel() < widest.in_features:
        raise ValueError(f"calib: method 'gptq' needs at least as many calibration tokens as the widest layer's "
                         f"input features ({widest.in_features}, layer {fqn!r}); got {calib.shape[0]} x "
                         f"{calib.shape[1]} = {calib.numel()}")
