"""Runs any parallax model family over one engine step, through the model's own modules.

The runner owns the paged KV cache, builds the step's attention metadata
(``attention_metadata.build_metadata``) and calls ``model.hidden_states`` on the flat batch of new
tokens inside ``forward_context(PagedAttentionContext(...))``: the model computes embeddings,
norms, projections, rotary positions and MLPs exactly as in training, and each of its
``Attention`` layers hands q, k, v to the context, which writes K/V into the cache and attends
over the paged context. Then ``model.logits`` runs on each sampling sequence's last token only.

With LoRA adapters (``loras``), ``forward`` takes each sequence's adapter slot and routes every
token through its own adapter (``parallax.inference.lora``).

Attention implementations (``attention=``): ``"paged"`` (the CUDA kernels), ``"torch"`` (the
CPU path: SDPA, and the compiled CPU paged_attention kernel for decodes when it is built),
``"auto"``: ``"paged"`` on CUDA when the kernels take this head size and block
size, else ``"torch"``; a prefix-tuned model always ``"torch"``. See ``attention_metadata`` for
what each does.

Shapes: T tokens this step, L attention layers, N blocks of B slots, Hkv KV heads, D head size, V vocabulary.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn

from parallax.inference.attention_metadata import PagedAttentionContext, SeqInput, StepMetadata, build_metadata
from parallax.inference.lora import LoraRegistry, TokenRouting, use_routing
from parallax.models.attention import attention_layers, forward_context
from parallax.ops.flash_attention import SUPPORTED_HEAD_DIMS as FLASH_HEAD_DIMS
from parallax.ops.paged_attention import BLOCK_SIZES as PAGED_BLOCK_SIZES
from parallax.ops.paged_attention import HEAD_DIMS as PAGED_HEAD_DIMS

__all__ = ["ModelRunner", "SeqInput", "ATTENTION_IMPLS", "resolve_attention", "attention_layers"]

log = logging.getLogger(__name__)

ATTENTION_IMPLS = ("auto", "paged", "torch")


def resolve_attention(attention: str, device: torch.device, head_dim: int, block_size: int) -> str:
    """The implementation ``attention`` means on ``device``: 'paged' or 'torch'."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}; got {attention!r}")
    supported = head_dim in PAGED_HEAD_DIMS and head_dim in FLASH_HEAD_DIMS and block_size in PAGED_BLOCK_SIZES
    if attention == "paged" and not supported:
        raise ValueError(f"attention='paged' needs a head size in {PAGED_HEAD_DIMS} and a block_size in "
                         f"{PAGED_BLOCK_SIZES}; got head size {head_dim}, block_size {block_size}")
    if attention == "auto":
        if device.type == "cuda" and not supported:
            log.warning("inference: the paged kernels do not take head size %d / block_size %d; "
                        "attending with SDPA over gathered K/V instead", head_dim, block_size)
        return "paged" if device.type == "cuda" and supported else "torch"
    return attention


def _prefix_attention(requested: str, resolved: str) -> str:
    """The implementation for a prefix-tuned model: 'torch' (the paged kernels read only the cache)."""
    if requested == "paged":
        raise ValueError("attention='paged' cannot serve a prefix-tuned model (the kernels read no virtual "
                         "tokens); use attention='torch' or 'auto'")
    if resolved == "paged":
        log.info("inference: prefix-tuned model; attending with SDPA over gathered K/V and the virtual tokens")
    return "torch"


class ModelRunner:
    """Runs the model over engine steps; owns the KV cache tensor (2, L, N, B, Hkv, D)."""

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, attention: str = "auto",
                 loras: LoraRegistry | None = None) -> None:
        param = next(model.parameters())
        self.model = model
        self.loras = loras
        self.device = param.device
        self.dtype = param.dtype
        self.block_size = block_size
        self.layers = attention_layers(model, "the inference engine", per_use=True)
        head_dim, kv_heads = self.layers[0].head_dim, self.layers[0].n_kv_head
        self.attention = resolve_attention(attention, self.device, head_dim, block_size)
        if any(layer.prefix is not None for layer in self.layers):
            self.attention = _prefix_attention(attention, self.attention)
        # zeros, not empty: the "torch" decode reads (and masks) stale slots, which must be finite
        self.kv_cache = torch.zeros((2, len(self.layers), num_blocks, block_size, kv_heads, head_dim),
                                    dtype=self.dtype, device=self.device)

    @staticmethod
    def bytes_per_block(model: nn.Module, block_size: int) -> int:
        """KV-cache bytes of one block across all layers (keys and values)."""
        layers = attention_layers(model, "the inference engine", per_use=True)
        elem = next(model.parameters()).element_size()
        return 2 * len(layers) * block_size * layers[0].n_kv_head * layers[0].head_dim * elem

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst takes block src's keys and values in every layer."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    @torch.inference_mode()
    def forward(self, seqs: list[SeqInput], lora_slots: list[int] | None = None) -> torch.Tensor:
        """Logits (S_sample, V), float32, for the sequences with ``sample`` set, in input order.
        ``lora_slots``: each sequence's adapter slot in ``loras`` (-1: the base model); None: all base."""
        meta = build_metadata(seqs, self.block_size, self.attention, self.device)
        context = PagedAttentionContext(self.kv_cache, self.layers, self.attention, meta)
        with forward_context(context), use_routing(self._routing(seqs, meta, lora_slots)):
            h = self.model.hidden_states(meta.input_ids[None], meta.positions[None])  # (1, T, C)
        return self.model.logits(h[0, meta.logits_rows]).float()  # only the rows that sample: (S_sample, V)

    def _routing(self, seqs: list[SeqInput], meta: StepMetadata, lora_slots: list[int] | None) -> TokenRouting | None:
        """The adapter slot of every token row (T,), in the metadata's row order."""
        if lora_slots is None or self.loras is None or max(lora_slots, default=-1) < 0:
            return None
        if len(lora_slots) != len(seqs):
            raise ValueError(f"lora_slots has {len(lora_slots)} entries for {len(seqs)} sequences")
        token_slots = np.repeat([lora_slots[i] for i in meta.order], [len(seqs[i].token_ids) for i in meta.order])
        return self.loras.routing(token_slots, self.device)
