"""GPTConfig: the hyperparameters of the reference GPT, with validation and named presets."""

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from parallax.validate import is_real, positive_int

from .attention import ATTENTION_BACKENDS

PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo: byte-level tokens (256 bytes + end-of-text = 257), ~0.8M parameters.
    "tiny": dict(block_size=128, vocab_size=257, n_layer=4, n_head=4, n_embd=128),
    # The OpenAI GPT-2 family (GPT-2 BPE vocabulary, 1024-token context).
    "gpt2": dict(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(block_size=1024, vocab_size=50257, n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(block_size=1024, vocab_size=50257, n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(block_size=1024, vocab_size=50257, n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


@dataclass(kw_only=True)
class GPTConfig:
    """Hyperparameters of a GPT-2-family model. Defaults are GPT-2 small (124M).

    Fields:
        block_size: maximum sequence length (number of learned position embeddings).
        vocab_size: number of token ids.
        n_layer: number of transformer blocks.
        n_head: number of query heads; must divide n_embd.
        n_kv_head: number of key/value heads; None means n_head. A divisor of n_head smaller
            than it gives grouped-query attention (each KV head serves n_head // n_kv_head
            query heads).
        n_embd: model width.
        n_inner: width of the MLP's hidden layer; None means 4 * n_embd (Hugging Face's GPT-2
            field; structured pruning sets it when it removes MLP channels).
        dropout: dropout probability on embeddings, attention weights and residual branches.
        bias: whether Linear and LayerNorm layers have biases (GPT-2 has them).
        layer_norm_eps: LayerNorm epsilon (GPT-2 uses 1e-5).
        attention: attention backend, a key of ``ATTENTION_BACKENDS``: "math", "sdpa", "flash"
            (parallax's Triton FlashAttention; no attention dropout) or "auto" (the default:
            "flash" on CUDA tensors, "sdpa" otherwise, decided on each call).
        share_layers: cross-layer weight sharing (ALBERT): every ``share_layers`` consecutive
            blocks are one module with one set of weights; n_layer must be a multiple of it.
            1 (the default): no sharing.
    """

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    n_embd: int = 768
    n_inner: int | None = None
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    attention: str = "auto"
    share_layers: int = 1

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            positive_int(f"GPTConfig.{name}", getattr(self, name))
        if self.n_inner is not None:
            positive_int("GPTConfig.n_inner", self.n_inner)
        check_share_layers("GPTConfig", self.n_layer, self.share_layers)
        if self.n_kv_head is not None:
            positive_int("GPTConfig.n_kv_head", self.n_kv_head)
            if self.n_head % self.n_kv_head != 0:
                raise ValueError(
                    f"GPTConfig.n_kv_head must divide n_head (n_head must be a multiple of it); "
                    f"got n_kv_head={self.n_kv_head}, n_head={self.n_head}"
                )
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd must be divisible by n_head; "
                f"got n_embd={self.n_embd}, n_head={self.n_head}"
            )
        if not is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be a number in [0, 1); got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be True or False; got {self.bias!r}")
        if not is_real(self.layer_norm_eps) or not self.layer_norm_eps > 0:
            raise ValueError(
                f"GPTConfig.layer_norm_eps must be a positive number; got {self.layer_norm_eps!r}"
            )
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"GPTConfig.attention must be one of {sorted(ATTENTION_BACKENDS)}; got {self.attention!r}"
            )

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads: n_kv_head, or n_head when it is None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_width(self) -> int:
        """Width of the MLP's hidden layer: n_inner, or 4 * n_embd when it is None."""
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @property
    def head_dim(self) -> int:
        """Width of one attention head, n_embd // n_head."""
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """Build a named preset from ``PRESETS``, with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict. None fields are left out (TOML has no null); they default to
        None. share_layers is left out when 1 (no sharing), as before the field existed."""
        return config_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """Inverse of ``to_dict``; unknown keys raise ValueError (catches typos in config files)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


def check_share_layers(owner: str, n_layer: int, share_layers: Any) -> None:
    """ValueError unless share_layers is a positive int that divides n_layer."""
    positive_int(f"{owner}.share_layers", share_layers)
    if n_layer % share_layers != 0:
        raise ValueError(f"{owner}.n_layer ({n_layer}) must be a multiple of share_layers ({share_layers}): every "
                         f"share_layers consecutive blocks share one set of weights")


def config_dict(config: Any) -> dict[str, Any]:
    """``to_dict`` of a model config: its fields but None ones, and share_layers when it is 1."""
    return {k: v for k, v in dataclasses.asdict(config).items()
            if v is not None and not (k == "share_layers" and v == 1)}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--model KEY=VALUE`` flags as GPTConfig overrides: VALUE is JSON (``n_layer=2``,
    ``bias=false``) or else a bare string (``attention=math``). Raises ValueError naming a bad item."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out
