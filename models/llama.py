"""The Llama-style decoder: Llama 2/3, Mistral, Qwen2/2.5, Qwen3 (and SmolLM), with Hugging
Face's parameter names, so imported weights, PEFT adapters and exported directories need no
renaming. No parallelism here.

Shapes: B batch, T sequence length, C = n_embd, H query heads, Hkv key/value heads, D head_dim,
V vocabulary size.
"""

import torch
import torch.nn as nn

from .attention import Attention, PackedSegments
from .generate import generate
from .layers import RMSNorm, SwiGLU, rotary_embedding
from .llama_config import LlamaConfig
from .loss import check_token_ids, lm_loss, packed_segments, shared_blocks
from .rope import inv_frequencies, rope_tables


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary positions, optional q/k/v biases (Qwen2) and
    per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        H, Hkv, D, C = config.n_head, config.kv_heads, config.head_dim, config.n_embd
        self.n_head, self.n_kv_head, self.head_dim = H, Hkv, D
        self.q_proj = nn.Linear(C, H * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(D, config.rms_norm_eps)
            self.k_norm = RMSNorm(D, config.rms_norm_eps)
        self.attend = Attention(config.attention, H, Hkv, D, config.dropout, config.sliding_window)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: PackedSegments | None = None) -> torch.Tensor:
        """x (B, T, C), cos/sin (B or 1, T, D // 2) -> (B, T, C); ``segments``: the packed
        examples, each attending within itself."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary_embedding(q, k, cos, sin)
        y = self.attend(q, k, v, segments)  # (B, T, H, D)
        return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    """One pre-RMSNorm block; the unit that ZeRO-3 and activation checkpointing wrap."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = SwiGLU(config.n_embd, config.intermediate_size, config.mlp_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: PackedSegments | None = None) -> torch.Tensor:
        """x (B, T, C), cos/sin (B or 1, T, D // 2) -> (B, T, C); ``segments``: the packed
        examples, each attending within itself."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segments)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, the decoder layers and the final norm (Hugging Face's ``model.`` prefix)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = shared_blocks(lambda: LlamaDecoderLayer(config), config.n_layer, config.share_layers)
        self.norm = RMSNorm(config.n_embd, config.rms_norm_eps)


class Llama(nn.Module):
    """A Llama-style causal language model: ``model(idx)`` -> logits (B, T, V),
    ``model(idx, targets)`` -> mean cross-entropy (negative targets ignored)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Inverse rotary frequencies per device, outside the state dict and outside model.to(dtype):
        # a bf16 table would rotate long positions by visibly wrong angles.
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        # Prefix tuning's virtual tokens take positions 0 .. P-1; the real tokens follow them.
        self.position_offset = 0
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self) -> int:
        """Number of parameters, counting a tied embedding / LM head matrix once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T), or with targets (B, T) the mean cross-entropy
        (``reduction="none"``: each target's, (B, T) fp32, 0 where ignored).

        positions (B or 1, T), when given, pack several examples per row (padding-free SFT): they
        restart at 0 at each example, and each example attends only within itself.
        """
        h = self.hidden_states(idx, positions, packed=positions is not None)
        return self.logits(h) if targets is None else lm_loss(h, self.lm_head.weight, targets, reduction)

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      packed: bool = False) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) for token ids idx (B, T) at positions (B or 1, T)
        (default 0 .. T-1; an engine passes each token's position in its sequence), each shifted by
        ``position_offset`` (the number of prefix-tuning virtual tokens, else 0).
        ``packed``: the positions restart at 0 at each of several examples per row, which attend
        only within themselves (see ``PackedSegments.from_positions``)."""
        check_token_ids(idx, self.config.block_size, positions)
        segments = packed_segments(idx, positions, self.config.block_size) if packed else None
        if positions is None:
            positions = torch.arange(idx.size(1), device=idx.device)[None]  # (1, T)
        positions = positions + self.position_offset
        cos, sin = rope_tables(self._frequencies(idx.device), positions)  # (B or 1, T, D // 2) each
        x = self.model.embed_tokens(idx)  # (B, T, C)
        for layer in self.model.layers:
            x = layer(x, cos, sin, segments)
        return self.model.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden states -> (..., V) logits, in the model's dtype."""
        return self.lm_head(h)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens, recomputing the context each step
        (no KV cache; ``parallax.inference.LLM`` serves with one). See ``models.generate.generate``."""
        return generate(self, idx, max_new_tokens, temperature, top_k, generator)

    def _frequencies(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            cfg = self.config
            self._inv_freq[device] = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
        return self._inv_freq[device]
