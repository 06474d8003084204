"""Many LoRA adapters over one base model in one batch (S-LoRA / Punica style), without merging.

``LoraRegistry`` loads PEFT-format adapter directories (what ``parallax finetune`` and the peft
library save) into the engine's model as extra, *inactive* adapters of its ``LoraLinear`` layers
(``px.peft.load_adapter``), each under a slot number; the model itself keeps computing as given
(its own active adapters, if any, are the "base"). Each ``LoraLinear`` gets stacks of every slot's
weights, zero-padded to the largest rank among them, in one slot order shared by all layers:

    lora_a (S, R, K), lora_b (S, N, R), scaling (S,)      S slots, R max rank, K in, N out features

On CPU lora_b is kept with its N dim contiguous (a transposed (S, R, N) tensor), the layout the
compiled sgmv kernel reads without a copy. A slot whose adapter does not target a layer has zeros
there (and scaling 0), so it adds nothing.
The stacks are rebuilt, lazily, at the first step after an adapter was added; the layers' own
``lora_A``/``lora_B`` weights of the served adapters are views into them (each adapter stored once).

Each engine step the runner routes the batch: ``routing(token_slots)`` (T,) (one slot per token,
-1 for the base model) inside ``use_routing``; every ``LoraLinear`` then adds
``px.ops.sgmv(x, lora_a, lora_b, token_slots, scaling)`` to its output (``parallax.peft.lora``):
Triton kernels on CUDA, the C++ kernel on CPU (``px.ops.sgmv_add_``: into the output in place;
dense torch fallbacks only when parallax._C did not load; see ``TokenRouting``).

The prefix cache keeps adapters apart by chaining block keys from ``prefix_root(name)``
(``parallax.inference.block_manager``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from parallax.peft.lora import LORA_ROUTING, LoraLinear, lora_layers
from parallax.peft.model import CONFIG_NAME, WEIGHTS_NAME, PeftModelMixin, load_adapter

__all__ = ["LoraRegistry", "LayerStacks", "TokenRouting", "use_routing"]

log = logging.getLogger(__name__)

BASE_SLOT = -1  # the slot of a request without an adapter


# Without the compiled CPU kernel (parallax._C failed to load), a layer whose stacks hold at most
# (K + N) / 2 slot-rank rows routes every token through all slots with one mask (three ops) instead
# of two matmuls per slot present on slot-sorted tokens.
# Measured (2 threads, K 256, N 768; per layer, masked vs sorted segments vs the base linear):
# S x R = 8 x 8: 32 tokens 67 vs 184 us (base 115), 512 tokens 447 vs 1802 (1126); 32 x 8: 263 vs 457 at
# 32 tokens, 1419 vs 2031 at 512; 64 x 16: 711 vs 437 at 32 tokens, 6440 vs 1683 at 512.
def _masked_is_cheaper(slots: int, rank: int, k: int, n: int) -> bool:
    return 2 * slots * rank <= k + n


def _cpu_sgmv_kernel() -> bool:
    """Whether px.ops.sgmv runs the compiled C++ kernel on CPU tensors (parallax._C loaded)."""
    from parallax.ops.sgmv import backend  # lazy: ops load the compiled extension

    return backend("cpu") == "cpu"


@dataclass(frozen=True)
class LayerStacks:
    """One layer's adapters by slot: lora_a (S, R, K), lora_b (S, N, R), scaling (S,) float32.
    On CPU lora_b is the transposed view of a contiguous (S, R, N) tensor (N contiguous: the CPU
    sgmv kernel's fast layout; ``lora_b.transpose(1, 2)`` is every slot's B^T, rows (slot, rank))."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: torch.Tensor


class LoraRegistry:
    """The adapters an engine serves: name -> slot, the per-layer stacks, the routing of a step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._slot_of: dict[str, int] = {}
        self._internal: list[str] = []  # slot -> the adapter's name inside the model's LoraLinear layers
        self._stacks: dict[LoraLinear, LayerStacks] | None = {}  # None: rebuild before the next step

    @property
    def names(self) -> list[str]:
        """The adapters' names, in slot order."""
        return list(self._slot_of)

    def __len__(self) -> int:
        return len(self._internal)

    def slot(self, name: str | None) -> int:
        """The slot of adapter ``name`` (``BASE_SLOT`` for None); ValueError naming ``lora`` and the
        known names for an unknown one."""
        if name is None:
            return BASE_SLOT
        slot = self._slot_of.get(name) if isinstance(name, str) else None
        if slot is None:
            raise ValueError(f"lora must be None (the base model) or one of the loaded adapters {self.names}; "
                             f"got {name!r}")
        return slot

    def add(self, name: str, path: str | os.PathLike) -> None:
        """Load the PEFT-format LoRA adapter directory ``path`` under ``name``. ValueError for a
        name already in use, a directory that is missing or holds no LoRA adapter, or an adapter
        saved for another base model (the model is then unchanged)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"add_lora: name must be a non-empty string; got {name!r}")
        if name in self._slot_of:
            raise ValueError(f"add_lora: name {name!r} is already in use; loaded adapters: {self.names}")
        directory = Path(path)
        _check_lora_dir(directory)
        internal = _free_internal_name(self.model, len(self._internal))
        try:
            load_adapter(self.model, directory, adapter_name=internal)
        except FileNotFoundError as e:  # raced with a deletion after the check
            raise ValueError(f"add_lora: {e}") from e
        self._slot_of[name] = len(self._internal)
        self._internal.append(internal)
        # Served only where routed: the model's own computation (the base) stays as it was. Every
        # served adapter, not just this one: loading into a model with adapters re-activates its
        # active one (PEFT's add_adapter), which is the first one served when the model had none.
        served = set(self._internal)
        for _, layer in lora_layers(self.model):
            layer.active_adapters = [n for n in layer.active_adapters if n not in served]
        self._stacks = None
        log.info("inference: LoRA adapter %r from %s in slot %d", name, directory, self._slot_of[name])

    def stacks(self, layer: LoraLinear) -> LayerStacks | None:
        """``layer``'s stacks, or None when no adapter targets it."""
        return self.all_stacks().get(layer)

    def all_stacks(self) -> dict[LoraLinear, LayerStacks]:
        """Every targeted layer's stacks (built at the first call after an adapter was added)."""
        if self._stacks is None:
            self._stacks = self._build()
        return self._stacks

    def routing(self, token_slots: list[int] | torch.Tensor, device: torch.device) -> TokenRouting | None:
        """The routing of a batch whose token t goes through slot ``token_slots[t]`` (T,);
        None when every token is the base model's (nothing to add)."""
        slots = torch.as_tensor(token_slots, dtype=torch.int64)  # on the host: checks cost no sync
        if slots.numel() and (slots.min() < BASE_SLOT or slots.max() >= len(self)):
            raise ValueError(f"token_slots must lie in [{BASE_SLOT}, {len(self)}); "
                             f"got {int(slots.min())}..{int(slots.max())}")
        if not bool((slots >= 0).any()):
            return None
        return TokenRouting(self, slots.to(device))

    def _build(self) -> dict[LoraLinear, LayerStacks]:
        """Stacks for every LoraLinear that some adapter targets, zero-padded to its largest rank.
        The layers' served adapter weights then become views into them: stored once. Normal
        tensors even when built inside the engine's inference mode (they are the model's weights)."""
        with torch.inference_mode(False), torch.no_grad():
            return self._build_stacks()

    def _build_stacks(self) -> dict[LoraLinear, LayerStacks]:
        stacks = {}
        for _, layer in lora_layers(self.model):
            present = [(s, n) for s, n in enumerate(self._internal) if n in layer.lora_A]
            if not present:
                continue
            rank = max(layer.r[n] for _, n in present)
            first = layer.lora_A[present[0][1]].weight
            a = torch.zeros(len(self), rank, layer.in_features, dtype=first.dtype, device=first.device)
            if first.device.type == "cpu":  # N contiguous (see LayerStacks)
                b = torch.zeros(len(self), rank, layer.out_features, dtype=first.dtype).transpose(1, 2)
            else:
                b = torch.zeros(len(self), layer.out_features, rank, dtype=first.dtype, device=first.device)
            scaling = torch.zeros(len(self), dtype=torch.float32, device=first.device)
            for s, n in present:
                r = layer.r[n]
                a[s, :r] = layer.lora_A[n].weight
                b[s, :, :r] = layer.lora_B[n].weight
                scaling[s] = layer.scaling[n]
                layer.lora_A[n].weight.data = a[s, :r]
                layer.lora_B[n].weight.data = b[s, :, :r]
            stacks[layer] = LayerStacks(a, b, scaling)
        return stacks


class TokenRouting:
    """One step's adapters per token, read by every ``LoraLinear`` (``parallax.peft.lora.LoraRouting``).
    Every layer adds ``px.ops.sgmv``: on CUDA its Triton kernels, with the sort into row tiles
    (``sgmv_plan``) made once per step; on CPU its C++ kernel, in place (``sgmv_add_``; it sorts
    the T slots itself, for less than a plan would cost). Only when that kernel is missing
    (parallax._C did not load), CPU layers fall back to dense torch ops: the tokens' slot mask
    (made once per step), or, when a layer has many slots, the slot order."""

    def __init__(self, registry: LoraRegistry, token_slots: torch.Tensor) -> None:
        self.registry = registry
        self.token_slots = token_slots  # (T,) int64
        self._stacks = registry.all_stacks()  # read by every layer: one dict lookup each
        self.plan = None  # CUDA: px.ops.sgmv's plan
        self.own: torch.Tensor | None = None  # CPU without the kernel: (T, S) 1.0 where the token's slot is s
        self._segments_cache: tuple[torch.Tensor, list[tuple[int, int, int]]] | None = None
        # CPU with the kernel: the in-place op itself, without px.ops.sgmv_add_'s argument checks (the
        # registry made the stacks, routing() checked the slots, the op checks shapes again): they were
        # 40% of a decode-step layer's LoRA cost (cProfile, 1 thread, batch 1: 28 of 70 us).
        self._cpu_add = None
        if token_slots.is_cuda:
            from parallax.ops.sgmv import sgmv_plan  # lazy: ops load the compiled extension

            self.plan = sgmv_plan(token_slots, len(registry))
        elif _cpu_sgmv_kernel():
            self._cpu_add = torch.ops.parallax.sgmv_add_
        else:
            self.own = (token_slots[:, None] == torch.arange(len(registry))[None, :]).float()

    @property
    def segments(self) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """CPU: the adapted tokens sorted by slot, and (slot, start, end) of each slot's run in that order."""
        if self._segments_cache is None:
            adapted = (self.token_slots >= 0).nonzero(as_tuple=True)[0]
            slots = self.token_slots[adapted]
            order = adapted[torch.argsort(slots, stable=True)]
            runs, start = [], 0
            for slot, count in enumerate(torch.bincount(slots, minlength=len(self.registry)).tolist()):
                if count:
                    runs.append((slot, start, start + count))
                    start += count
            self._segments_cache = (order, runs)
        return self._segments_cache

    def add_update(self, layer: LoraLinear, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result (..., N), ``layer``'s output for x (..., K) whose leading dims flatten to the step's
        T tokens, plus each token's adapter update, in result's dtype (the sum in the adapters' dtype,
        float32 over a half-precision base, as PEFT). On CPU with the kernel it is added in place
        (``sgmv_add_``): result is the layer's fresh output, which no backward reads (a linear
        layer's saves its input and weight)."""
        stacks = self._stacks.get(layer)
        if stacks is None:
            return result
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if flat.shape[0] != self.token_slots.shape[0]:
            raise RuntimeError(f"LoRA routing: a LoraLinear got {flat.shape[0]} tokens in a step of "
                               f"{self.token_slots.shape[0]}; per-token adapters need every token in order")
        if self._cpu_add is not None and result.is_contiguous():
            self._cpu_add(result.view(flat.shape[0], -1), flat, stacks.lora_a, stacks.lora_b, self.token_slots,
                          stacks.scaling)
            return result
        delta = self._delta(stacks, flat).view(*result.shape)
        summed = result + delta
        return summed if summed.dtype == result.dtype else summed.to(result.dtype)

    def _delta(self, stacks: LayerStacks, flat: torch.Tensor) -> torch.Tensor:
        """flat (T, K) -> (T, N) in the adapters' dtype, zero for base tokens."""
        if self.own is not None:
            slots, rank, k = stacks.lora_a.shape
            if _masked_is_cheaper(slots, rank, k, stacks.lora_b.shape[1]):
                return self._masked(stacks, flat)
            return self._sorted(stacks, flat)
        from parallax.ops.sgmv import sgmv

        return sgmv(flat, stacks.lora_a, stacks.lora_b, self.token_slots, stacks.scaling, plan=self.plan)

    def _masked(self, stacks: LayerStacks, x: torch.Tensor) -> torch.Tensor:
        """sgmv's result as three dense ops: x (T, K) through every slot's A, each token's own slot
        kept (and scaled) by the mask, then every slot's B: (T, K) -> (T, S*R) -> (T, N)."""
        s, r, k = stacks.lora_a.shape
        u = x.to(stacks.lora_a.dtype) @ stacks.lora_a.view(s * r, k).T
        keep = (self.own * stacks.scaling).to(u.dtype)  # (T, S)
        u = (u.view(-1, s, r) * keep[:, :, None]).view(-1, s * r)
        return u @ stacks.lora_b.transpose(1, 2).reshape(s * r, -1)  # a view: (S, R, N) is contiguous

    def _sorted(self, stacks: LayerStacks, x: torch.Tensor) -> torch.Tensor:
        """sgmv's result from the slot-sorted tokens: two matmuls per slot present on contiguous
        slices (no per-layer search for each slot's tokens), scattered back once."""
        order, runs = self.segments
        dtype = stacks.lora_a.dtype
        xs = x.index_select(0, order).to(dtype)
        ys = torch.empty(xs.shape[0], stacks.lora_b.shape[1], dtype=dtype)
        for slot, start, end in runs:
            u = (xs[start:end] @ stacks.lora_a[slot].T) * stacks.scaling[slot].to(dtype)
            torch.mm(u, stacks.lora_b[slot].T, out=ys[start:end])  # lora_b[slot].T: (R, N) contiguous
        out = torch.zeros(x.shape[0], ys.shape[1], dtype=ys.dtype)
        return out.index_copy_(0, order, ys)


@contextmanager
def use_routing(routing: TokenRouting | None) -> Iterator[None]:
    """Within the block every ``LoraLinear`` (of this thread) adds ``routing``'s update; None: nothing."""
    if routing is None:
        yield
        return
    token = LORA_ROUTING.set(routing)
    try:
        yield
    finally:
        LORA_ROUTING.reset(token)


def _check_lora_dir(directory: Path) -> None:
    """ValueError naming ``directory`` unless it holds a PEFT LoRA adapter."""
    if not directory.is_dir():
        raise ValueError(f"add_lora: path {str(directory)!r} is not a directory (a LoRA adapter directory holds "
                         f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    for file in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / file).is_file():
            raise ValueError(f"add_lora: path {str(directory)!r} has no {file} (a LoRA adapter directory holds "
                             f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        fields = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"add_lora: {directory / CONFIG_NAME} is not valid JSON: {e}") from e
    kind = fields.get("peft_type", "LORA") if isinstance(fields, dict) else None
    if kind != "LORA":
        raise ValueError(f"add_lora: path {str(directory)!r} holds a {kind} adapter; only LoRA adapters can be "
                         "served side by side (load a prefix-tuning adapter into the model before the engine)")


def _free_internal_name(model: nn.Module, slot: int) -> str:
    """A name for the adapter inside the model (external names may hold dots, which modules cannot)."""
    taken = set(model.peft_config) if isinstance(model, PeftModelMixin) else set()
    name, k = f"serve_lora_{slot}", 0
    while name in taken:
        k += 1
        name = f"serve_lora_{slot}_{k}"
    return name
