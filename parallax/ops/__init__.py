"""parallax operators: compiled C++/CUDA and Triton kernels, each beside its PyTorch reference."""

from __future__ import annotations

import torch

from parallax.ops import adamw as _adamw
from parallax.ops import flash_attention as _flash_attention
from parallax.ops import linear_cross_entropy as _linear_cross_entropy
from parallax.ops import lora_linear as _lora_linear
from parallax.ops import paged_attention as _paged_attention
from parallax.ops import paged_attention_varlen as _paged_attention_varlen
from parallax.ops import quant_linear as _quant_linear
from parallax.ops import rms_norm as _rms_norm
from parallax.ops import rotary_embedding as _rotary_embedding
from parallax.ops import sgmv as _sgmv
from parallax.ops import stream as _stream
from parallax.ops import swiglu as _swiglu
from parallax.ops import unscale as _unscale
from parallax.ops.adamw import adamw_, adamw_ref
from parallax.ops.flash_attention import (flash_attention, flash_attention_ref, flash_attention_varlen,
                                          flash_attention_varlen_ref)
from parallax.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from parallax.ops.lora_linear import lora_linear, lora_linear_ref
from parallax.ops.paged_attention import paged_attention, paged_attention_ref, reshape_and_cache, reshape_and_cache_ref
from parallax.ops.paged_attention_varlen import paged_attention_varlen, paged_attention_varlen_ref
from parallax.ops.quant_linear import int4_linear, int4_linear_ref, int8_linear, int8_linear_ref
from parallax.ops.rms_norm import rms_norm, rms_norm_ref
from parallax.ops.rotary_embedding import rotary_embedding, rotary_embedding_ref
from parallax.ops.sgmv import sgmv, sgmv_add_, sgmv_ref
from parallax.ops.stream import stream_triad_, stream_triad_ref
from parallax.ops.swiglu import swiglu, swiglu_ref
from parallax.ops.unscale import unscale_, unscale_ref

__all__ = ["adamw_", "adamw_ref", "flash_attention", "flash_attention_ref", "flash_attention_varlen",
           "flash_attention_varlen_ref", "int4_linear", "int4_linear_ref", "int8_linear", "int8_linear_ref",
           "linear_cross_entropy", "linear_cross_entropy_ref", "lora_linear",
           "lora_linear_ref", "paged_attention", "paged_attention_ref", "paged_attention_varlen",
           "paged_attention_varlen_ref", "reshape_and_cache", "reshape_and_cache_ref", "rms_norm", "rms_norm_ref",
           "rotary_embedding", "rotary_embedding_ref", "sgmv", "sgmv_add_", "sgmv_ref", "stream_triad_",
           "stream_triad_ref", "swiglu", "swiglu_ref", "unscale_", "unscale_ref", "backend"]

_BACKENDS = {"adamw": _adamw.backend, "flash_attention": _flash_attention.backend,
             "int4_linear": _quant_linear.backend, "int8_linear": _quant_linear.backend,
             "linear_cross_entropy": _linear_cross_entropy.backend, "lora_linear": _lora_linear.backend,
             "paged_attention": _paged_attention.backend, "paged_attention_varlen": _paged_attention_varlen.backend,
             "reshape_and_cache": _paged_attention.reshape_and_cache_backend, "rms_norm": _rms_norm.backend,
             "rotary_embedding": _rotary_embedding.backend, "sgmv": _sgmv.backend, "sgmv_add_": _sgmv.backend,
             "stream_triad": _stream.backend, "swiglu": _swiglu.backend,
             "unscale": _unscale.backend}


def backend(op: str, device: torch.device | str = "cpu") -> str:
    """Name of the implementation ``op`` runs for tensors on ``device`` (e.g. 'cpp', 'cuda', 'triton', 'reference')."""
    if op not in _BACKENDS:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[op](device)
