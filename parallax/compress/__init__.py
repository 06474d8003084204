"""Model compression: quantization, pruning, low-rank factorization, weight sharing, distillation
(``px.compress``). Every method changes an ``nn.Module`` in place and returns it."""

from parallax.compress.checkpoint import is_compressed, load, read_manifest, save
from parallax.compress.common import calibration_tokens, target_linears
from parallax.compress.distill import distill_loss, distill_loss_ref
from parallax.compress.low_rank import LowRankLinear, low_rank
from parallax.compress.prune import prune
from parallax.compress.quant_linear import QuantLinear
from parallax.compress.quantize import dequantize, quantize
from parallax.compress.recover import recover, sparsity_masks

__all__ = ["calibration_tokens", "target_linears", "save", "load", "is_compressed", "read_manifest", "recover",
           "sparsity_masks", "prune", "LowRankLinear", "low_rank", "QuantLinear", "dequantize", "quantize",
           "distill_loss", "distill_loss_ref", "DistillConfig"]


def __getattr__(name: str):
    """``DistillConfig`` on first use: it imports the training loop's config, which ``import
    parallax`` should not pay for."""
    if name == "DistillConfig":
        from parallax.compress.distill_config import DistillConfig

        return DistillConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
