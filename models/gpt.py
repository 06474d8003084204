"""The reference GPT: GPT-2 architecture, nanoGPT/Hugging Face parameter names, no parallelism.

Shapes: B batch, T sequence length, C = n_embd, nh query heads, nkv key/value heads,
hs = C // nh head width, V vocabulary size.
"""

import json
import math
import os
from typing import Any

import torch
import torch.nn as nn

from .attention import Attention, PackedSegments
from .config import GPTConfig
from .generate import generate
from .hf_read import unique_tensors
from .loss import check_token_ids, lm_loss, packed_segments, shared_blocks
from .weights import read_safetensors, write_safetensors

# lm_head.weight is transformer.wte.weight; checkpoints store the tensor once, under the value.
TIED_WEIGHTS = {"lm_head.weight": "transformer.wte.weight"}

# Key of the safetensors metadata entry that holds GPTConfig.to_dict() as JSON.
CONFIG_METADATA_KEY = "parallax.gpt_config"


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with one fused QKV projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        kv_dim = self.n_kv_head * self.head_dim
        # q, k, v projections in one matmul; k and v are narrower under grouped-query attention.
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attend = Attention(config.attention, self.n_head, self.n_kv_head, self.head_dim, config.dropout)

    def forward(self, x: torch.Tensor, segments: PackedSegments | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); ``segments``: the packed examples, each attending within itself."""
        B, T, C = x.size()
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hs)
        y = self.attend(q, k, v, segments).reshape(B, T, C)  # (B, T, nh, hs): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: C -> mlp_width (4C unless n_inner sets it) -> C with GPT-2's
    tanh-approximated GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # what GPT-2 (and HF's "gelu_new") computes
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C)."""
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block; the unit that ZeRO-3 and checkpointing wrap."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, segments: PackedSegments | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); ``segments``: the packed examples, each attending within itself."""
        x = x + self.attn(self.ln_1(x), segments)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, n_layer Blocks, final LayerNorm, tied LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=shared_blocks(lambda: Block(config), config.n_layer, config.share_layers),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2 does
        # Prefix tuning's virtual tokens take positions 0 .. P-1; the real tokens follow them.
        self.position_offset = 0

        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # since each block adds two of them to it.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters, counting the tied wte/lm_head matrix once.

        With non_embedding=True the position embeddings are left out; the token embeddings stay
        in because, tied to lm_head, they are also the weights of the final layer (as nanoGPT).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T), or with targets (B, T) the mean cross-entropy
        (``reduction="none"``: each target's, (B, T) fp32, 0 where ignored).

        Target positions equal to -1 or -100 (Hugging Face's ignore index) are ignored in the loss.
        positions (B or 1, T), when given, pack several examples per row (padding-free SFT): they
        restart at 0 at each example, and each example attends only within itself.
        """
        h = self.hidden_states(idx, positions, packed=positions is not None)
        return self.logits(h) if targets is None else lm_loss(h, self.lm_head.weight, targets, reduction)

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      packed: bool = False) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, C) for token ids idx (B, T) at positions (B, T)
        (default 0 .. T-1 in every row; an engine passes each token's position in its sequence), each
        shifted by ``position_offset`` (the number of prefix-tuning virtual tokens, else 0).
        ``packed``: the positions restart at 0 at each of several examples per row, which attend
        only within themselves (see ``PackedSegments.from_positions``)."""
        check_token_ids(idx, self.config.block_size, positions)
        segments = packed_segments(idx, positions, self.config.block_size) if packed else None
        if positions is None:
            positions = torch.arange(idx.size(1), dtype=torch.long, device=idx.device)  # (T,)
        positions = positions + self.position_offset
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(positions)  # (B or 1, T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, segments)
        return self.transformer.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden states -> (..., V) logits, in the model's dtype."""
        return self.lm_head(h)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens, recomputing the context each step
        (no KV cache; ``parallax.inference.LLM`` serves with one). See ``models.generate.generate``."""
        return generate(self, idx, max_new_tokens, temperature, top_k, generator)

    def save(self, path: str | os.PathLike) -> None:
        """Write the weights and config to a safetensors file, atomically (needs safetensors); a
        tied or shared (``share_layers``) tensor once, under its first name."""
        state = {k: v for k, v in unique_tensors(self).items() if k not in TIED_WEIGHTS}
        write_safetensors(path, state, {CONFIG_METADATA_KEY: json.dumps(self.config.to_dict())})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "GPT":
        """Rebuild a model written by ``save``: its config, weights and dtype, on device."""
        state, metadata = read_safetensors(path, device)
        if CONFIG_METADATA_KEY not in metadata:
            raise ValueError(
                f"{os.fspath(path)!r} has no {CONFIG_METADATA_KEY!r} metadata; was it written by GPT.save?"
            )
        config = GPTConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        return cls._from_state(config, state, device)

    @classmethod
    def from_hf(cls, source: "str | os.PathLike | nn.Module", **overrides: Any) -> "GPT":
        """Import Hugging Face GPT-2 weights into a new model that owns copies of them.

        source: a directory written by ``save_pretrained`` (config.json plus model.safetensors,
        sharded safetensors, or pytorch_model.bin; transformers is not needed), or a
        ``transformers`` GPT2LMHeadModel / GPT2Model object. overrides replace GPTConfig fields
        derived from the HF config, e.g. ``attention="math"`` or ``dropout=0.0``. The model is on
        the CPU, in the dtype of the source's weights. ``parallax.models.from_hf`` reads every family.
        """
        from .hf import load_hf  # models.hf imports this module

        return load_hf(source, overrides, cls)

    @classmethod
    def _from_state(
        cls, config: GPTConfig, state: dict[str, torch.Tensor], device: str | torch.device
    ) -> "GPT":
        # state holds the tied embedding once, under transformer.wte.weight (see TIED_WEIGHTS).
        with torch.device(device):
            model = cls(config)
        expected = set(unique_tensors(model)) - set(TIED_WEIGHTS)
        if set(state) != expected:
            raise ValueError(
                f"weights do not fit {config}: missing {sorted(expected - set(state))}, "
                f"unexpected {sorted(set(state) - expected)}"
            )
        model.to(state["transformer.wte.weight"].dtype)
        # Copies into the model's own parameters: nothing is shared with `state`; a tied or shared
        # tensor is filled through its first name.
        model.load_state_dict(state, strict=False)
        return model
