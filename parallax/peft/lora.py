"""The LoRA layer and where it goes: ``LoraLinear`` wraps an ``nn.Linear`` with named adapters,
``find_targets`` resolves ``LoraConfig.target_modules`` against a model as PEFT does.

The base may also be a quantized ``px.compress.QuantLinear`` (QLoRA): it stays frozen and
quantized, gradients reach the adapters through its dequantize-on-the-fly matmul, and merging
adds ``scaling * B @ A`` to its dequantized weight, then re-quantizes the sum by round-to-nearest
with the same bits and groups (as PEFT does for bitsandbytes bases), onto the layer's existing
grid where the sum still fits it (``QuantLinear.requantize_``): each weight then moves by at
most the adapter's update, and unmerging restores the base there. The merged layer differs from the
unmerged one by that rounding; for an exact merge into dense layers call
``px.compress.dequantize(model)`` first.

``LoraLinear`` keeps PEFT's module layout, so parameter names are PEFT's:
``<path>.base_layer.weight``, ``<path>.lora_A.<adapter>.weight`` (r, in), ``<path>.lora_B.<adapter>.weight`` (out, r).

Many adapters in one batch (the inference engine, ``parallax.inference.lora``): while
``LORA_ROUTING`` holds a routing, each ``LoraLinear`` also adds that routing's update (every
token through its own adapter, ``px.ops.sgmv_add_``) to its output. Outside the engine it is None.
"""

import math
import re
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Protocol

import torch
from torch import nn

from .config import LoraConfig

# PEFT keeps adapters of a half-precision base in float32 (get_peft_model's autocast_adapter_dtype=True).
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)
_LORA_CHILDREN = frozenset({"base_layer", "lora_A", "lora_B", "lora_dropout"})


class LoraRouting(Protocol):
    """Per-token adapters of one batch (``parallax.inference.lora.TokenRouting`` is one)."""

    def add_update(self, layer: "LoraLinear", x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (..., out_features), ``layer``'s output for input x (..., in_features), plus the
        routed adapters' update, in result's dtype; may add in place into ``result`` (a fresh output
        of the layer that nothing else holds)."""
        ...


# A context variable, not a global: each thread (the serving engine's own, a user's) sees its own.
LORA_ROUTING: ContextVar[LoraRouting | None] = ContextVar("parallax_lora_routing", default=None)


class LoraLinear(nn.Module):
    """y = base_layer(x) + sum over active adapters of scaling * lora_B(lora_A(dropout(x))).

    x (..., in_features) -> (..., out_features). Merged adapters live inside base_layer.weight
    and are skipped in forward; with ``disable_adapters`` set, only the base layer runs (merged
    adapters are unmerged first, as PEFT does). While ``LORA_ROUTING`` is set (an inference engine
    step), the routing's per-token update is added to that result.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False

    def update_layer(self, adapter_name: str, config: LoraConfig) -> None:
        """Add adapter ``adapter_name``: A (r, in) and B (out, r) initialised per config, on the base
        weight's device, in its dtype (float32 for a float16/bfloat16 base, as PEFT)."""
        base_dtype, device = _base_dtype_device(self.base_layer)
        dtype = torch.float32 if base_dtype in _UPCAST_DTYPES else base_dtype
        factory = {"device": device, "dtype": dtype}
        self.lora_A[adapter_name] = nn.Linear(self.in_features, config.r, bias=False, **factory)
        self.lora_B[adapter_name] = nn.Linear(config.r, self.out_features, bias=False, **factory)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = config.scaling
        _init_adapter(self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight, config)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self._forward_active(x)
        routing = LORA_ROUTING.get()
        return result if routing is None else routing.add_update(self, x, result)

    def _forward_active(self, x: torch.Tensor) -> torch.Tensor:
        """base_layer(x) plus the active adapters (the model as trained or loaded)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if self.merged:
            return self.base_layer(x)
        active = [name for name in self.active_adapters if name in self.lora_A]
        if not active:  # a served engine's layers (adapters routed per token, none active)
            return self.base_layer(x)
        fused = _fused_op(x, self.base_layer, active)
        if fused is not None:
            return self._fused_forward(fused, x, active[0])
        result = self.base_layer(x)
        result_dtype = result.dtype
        for name in active:
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(lora_A.weight.dtype))
            result = result + lora_B(lora_A(h)) * self.scaling[name]
        return result.to(result_dtype)

    def _fused_forward(self, op, x: torch.Tensor, name: str) -> torch.Tensor:
        """One adapter through px.ops.lora_linear (CUDA); float32 adapters of a half-precision
        base run the low-rank path in float32, as the plain path and PEFT do."""
        dropout = self.lora_dropout[name]
        lora_x = None if isinstance(dropout, nn.Identity) else dropout(x)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        return op(x, self.base_layer.weight, self.base_layer.bias, A, B, self.scaling[name], lora_x=lora_x)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A, (out, in), in float32."""
        A = self.lora_A[adapter_name].weight.detach().float()
        B = self.lora_B[adapter_name].weight.detach().float()
        return (B @ A) * self.scaling[adapter_name]

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Add the given adapters (default: the active ones) into base_layer.weight (a quantized
        base: into its dequantized weight, re-quantized onto its grid, see the module docstring)."""
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                _add_to_base_weight(self.base_layer, self.delta_weight(name))
                self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter from base_layer.weight, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            _add_to_base_weight(self.base_layer, -self.delta_weight(name))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"


def _quant_linear_class() -> type[nn.Module]:
    from parallax.compress.quant_linear import QuantLinear  # lazy: it imports the ops
    return QuantLinear


def _adaptable(module: nn.Module) -> bool:
    """Whether LoRA can wrap ``module``: an nn.Linear, a quantized QuantLinear, or a LoraLinear already."""
    return isinstance(module, (nn.Linear, LoraLinear, _quant_linear_class()))


def _base_dtype_device(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The compute dtype and device of a base layer (a QuantLinear has no float weight)."""
    if isinstance(base, _quant_linear_class()):
        return base.dtype, base.qweight.device
    return base.weight.dtype, base.weight.device


def _add_to_base_weight(base: nn.Module, delta: torch.Tensor) -> None:
    """base weight += delta (float32, (out, in)); a QuantLinear re-quantizes the sum onto its grid."""
    if isinstance(base, _quant_linear_class()):
        base.requantize_(base.dequantized_weight(torch.float32) + delta)
        return
    weight = base.weight
    weight.copy_((weight.float() + delta).to(weight.dtype))


def _init_adapter(A: torch.Tensor, B: torch.Tensor, config: LoraConfig) -> None:
    """PEFT's reset_lora_parameters: A Kaiming-uniform (a=sqrt(5)) or normal(std 1/r), B zero;
    init_lora_weights=False keeps nn.Linear's default init of both."""
    if config.init_lora_weights is False:
        return
    with torch.no_grad():
        if config.init_lora_weights is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        else:
            nn.init.normal_(A, std=1.0 / config.r)
        nn.init.zeros_(B)


def _fused_op(x: torch.Tensor, base: nn.Linear, active: list[str]):
    """px.ops.lora_linear when it applies: a CUDA input in the base weight's dtype, a plain
    nn.Linear base and one active adapter; None otherwise (the plain-PyTorch path, the reference)."""
    if not x.is_cuda or len(active) != 1 or type(base) is not nn.Linear or x.dtype != base.weight.dtype:
        return None
    from parallax import ops  # lazy: ops imports the compiled extension
    return getattr(ops, "lora_linear", None)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(dotted name, layer) of every LoraLinear in model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Dotted names of the modules config.target_modules selects, with PEFT's matching rules.

    Raises ValueError naming each list entry that matches no module, a pattern that matches
    nothing, or a selected module that is not an nn.Linear.
    """
    candidates = [(name, m) for name, m in model.named_modules() if name and not _inside_lora(name)]
    if config.all_linear:
        head = _output_head_name(model)
        names = [n for n, m in candidates if _adaptable(m) and n != head]
        if not names:
            raise ValueError("LoraConfig.target_modules='all-linear' matched no nn.Linear (other than the output "
                             f"head) in {type(model).__name__}")
        return names
    if isinstance(config.target_modules, str):
        names = [n for n, _ in candidates if re.fullmatch(config.target_modules, n)]
        if not names:
            raise ValueError(f"LoraConfig.target_modules pattern {config.target_modules!r} matches no module name "
                             f"of {type(model).__name__} (it must match a full dotted name, e.g. {candidates[0][0]!r})")
    else:
        names = [n for n, _ in candidates if any(_suffix_match(n, t) for t in config.target_modules)]
        unmatched = [t for t in config.target_modules if not any(_suffix_match(n, t) for n, _ in candidates)]
        if unmatched:
            raise ValueError(f"LoraConfig.target_modules entries {unmatched} match no module of "
                             f"{type(model).__name__}")
    _refuse_fused_loss_head(model, names)
    modules = dict(candidates)
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not _adaptable(modules[n])]
    if wrong:
        raise ValueError(f"LoraConfig.target_modules selects modules that are not nn.Linear: {', '.join(wrong)}; "
                         "LoRA adapts nn.Linear (or quantized QuantLinear) layers only")
    return names


def _refuse_fused_loss_head(model: nn.Module, names: list[str]) -> None:
    """parallax's models compute the training loss from ``lm_head.weight`` (a fused linear
    cross-entropy), which would skip an adapter on the head: refuse it rather than train nothing."""
    from parallax.models import GPT, Llama  # lazy: models import the ops

    head = _output_head_name(model)
    if isinstance(model, (GPT, Llama)) and head in names:
        raise ValueError(f"LoraConfig.target_modules selects the output head {head!r}; {type(model).__name__} "
                         f"computes its loss from {head}.weight directly, so leave it out (\"all-linear\" does)")


def _suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _inside_lora(name: str) -> bool:
    """Whether a module name is a LoraLinear's own child (never a target itself, as in PEFT)."""
    return not _LORA_CHILDREN.isdisjoint(name.split("."))


def _output_head_name(model: nn.Module) -> str | None:
    """The output head that "all-linear" leaves out: get_output_embeddings() where the model has
    it (transformers), else a top-level ``lm_head`` (parallax's models)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else getattr(model, "lm_head", None)
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if m is head), None)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted ``name`` to ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)

