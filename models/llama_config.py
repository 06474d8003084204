"""LlamaConfig: the hyperparameters of the Llama-style decoder family (Llama 2/3, Mistral,
Qwen2/2.5, Qwen3, SmolLM), validated, with named presets of the published shapes."""

import dataclasses
from dataclasses import dataclass
from typing import Any

from parallax.validate import is_real, positive_int

from .attention import ATTENTION_BACKENDS
from .config import check_share_layers, config_dict
from .rope import check_rope_scaling

# The Hugging Face architectures this family reads and writes (config.json's model_type).
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    # Real shapes (random initialisation: nothing is downloaded).
    "llama-3.2-1b": dict(model_type="llama", block_size=131072, vocab_size=128256, n_layer=16, n_head=32,
                         n_kv_head=8, n_embd=2048, intermediate_size=8192, rms_norm_eps=1e-5,
                         rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", block_size=32768, vocab_size=151936, n_layer=24, n_head=14,
                         n_kv_head=2, n_embd=896, intermediate_size=4864, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, attention_bias=True, tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", block_size=8192, vocab_size=49152, n_layer=30, n_head=9,
                         n_kv_head=3, n_embd=576, intermediate_size=1536, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "mistral-7b": dict(model_type="mistral", block_size=32768, vocab_size=32000, n_layer=32, n_head=32,
                       n_kv_head=8, n_embd=4096, intermediate_size=14336, rms_norm_eps=1e-5,
                       rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False),
    "qwen3-0.6b": dict(model_type="qwen3", block_size=40960, vocab_size=151936, n_layer=28, n_head=16,
                       n_kv_head=8, n_embd=1024, head_dim=128, intermediate_size=3072, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, qk_norm=True, tie_word_embeddings=True),
    # Tiny presets for CPU: byte-level tokens (256 bytes + end-of-text = 257), ~1M parameters,
    # each exercising its family's features.
    "llama-tiny": dict(model_type="llama", block_size=256, vocab_size=257, n_layer=4, n_head=4, n_kv_head=2,
                       n_embd=128, intermediate_size=352, rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling={**_LLAMA3_SCALING, "factor": 8.0, "original_max_position_embeddings": 64},
                       tie_word_embeddings=True),
    "mistral-tiny": dict(model_type="mistral", block_size=256, vocab_size=257, n_layer=4, n_head=4, n_kv_head=2,
                         n_embd=128, intermediate_size=352, rms_norm_eps=1e-5, sliding_window=64,
                         tie_word_embeddings=False),
    "qwen2-tiny": dict(model_type="qwen2", block_size=256, vocab_size=257, n_layer=4, n_head=4, n_kv_head=2,
                       n_embd=128, intermediate_size=352, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       attention_bias=True, tie_word_embeddings=True),
    "qwen3-tiny": dict(model_type="qwen3", block_size=256, vocab_size=257, n_layer=4, n_head=4, n_kv_head=2,
                       n_embd=128, head_dim=48, intermediate_size=352, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, qk_norm=True, tie_word_embeddings=True),
}


@dataclass(kw_only=True)
class LlamaConfig:
    """Hyperparameters of a Llama-style decoder. Defaults are Llama 2 7B's shape.

    Fields (Hugging Face's name in brackets where it differs):
        model_type: the HF architecture written by ``to_hf``: "llama", "mistral", "qwen2" or "qwen3".
        block_size: most positions a sequence may use [max_position_embeddings].
        vocab_size: number of token ids.
        n_layer, n_head, n_embd: blocks, query heads, model width
            [num_hidden_layers, num_attention_heads, hidden_size].
        n_kv_head: key/value heads (grouped-query attention); None means n_head [num_key_value_heads].
        head_dim: width of one head; None becomes n_embd // n_head (Qwen3 sets it explicitly).
        intermediate_size: width of the SwiGLU MLP.
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: rotary base frequency. rope_scaling: None, or a dict with "rope_type" "linear"
            (factor) or "llama3" (factor, low_freq_factor, high_freq_factor,
            original_max_position_embeddings); any other type is an error, not silently ignored.
        attention_bias: biases on the q, k, v projections (Qwen2). attention_out_bias: bias on
            the output projection. mlp_bias: biases in the MLP.
        qk_norm: RMSNorm over each head of q and k before the rotation (Qwen3).
        tie_word_embeddings: the LM head shares the token embedding matrix.
        sliding_window: each query sees at most this many most recent tokens (Mistral); None: all.
        dropout: attention dropout probability [attention_dropout].
        initializer_range: standard deviation of the random initialisation.
        attention: backend, a key of ``ATTENTION_BACKENDS`` ("auto", "flash", "sdpa", "math").
        share_layers: cross-layer weight sharing (ALBERT): every ``share_layers`` consecutive
            decoder layers are one module with one set of weights; n_layer must be a multiple of
            it. 1 (the default): no sharing. Hugging Face has no such field: ``to_hf`` writes
            each layer's copy.
    """

    model_type: str = "llama"
    block_size: int = 4096
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    n_embd: int = 4096
    head_dim: int | None = None
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    dropout: float = 0.0
    initializer_range: float = 0.02
    attention: str = "auto"
    share_layers: int = 1

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig.model_type must be one of {list(MODEL_TYPES)}; got {self.model_type!r}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "intermediate_size"):
            positive_int(f"LlamaConfig.{name}", getattr(self, name))
        check_share_layers("LlamaConfig", self.n_layer, self.share_layers)
        for name in ("n_kv_head", "head_dim", "sliding_window"):
            if getattr(self, name) is not None:
                positive_int(f"LlamaConfig.{name}", getattr(self, name))
        if self.n_head % self.kv_heads != 0:
            raise ValueError(f"LlamaConfig.n_kv_head must divide n_head; got n_kv_head={self.n_kv_head}, "
                             f"n_head={self.n_head}")
        if self.head_dim is None:
            if self.n_embd % self.n_head != 0:
                raise ValueError(f"LlamaConfig.n_embd must be divisible by n_head when head_dim is None; "
                                 f"got n_embd={self.n_embd}, n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2 != 0:
            raise ValueError(f"LlamaConfig.head_dim must be even (rotary embeddings rotate pairs); "
                             f"got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if not is_real(value) or not value > 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number; got {value!r}")
        if not is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LlamaConfig.dropout must be a number in [0, 1); got {self.dropout!r}")
        for name in ("attention_bias", "attention_out_bias", "mlp_bias", "qk_norm", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LlamaConfig.{name} must be True or False; got {getattr(self, name)!r}")
        check_rope_scaling("LlamaConfig.rope_scaling", self.rope_scaling)
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"LlamaConfig.attention must be one of {sorted(ATTENTION_BACKENDS)}; "
                             f"got {self.attention!r}")

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads: n_kv_head, or n_head when it is None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """Build a named preset from ``LLAMA_PRESETS``, with any field overridden by keyword."""
        if name not in LLAMA_PRESETS:
            raise ValueError(f"unknown Llama-family preset {name!r}; known presets: {sorted(LLAMA_PRESETS)}")
        return cls.from_dict({**LLAMA_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict. None fields are left out (TOML has no null); they default to
        None. share_layers is left out when 1 (no sharing), as before the field existed."""
        return config_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Inverse of ``to_dict``; unknown keys raise ValueError (catches typos in config files)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)
