"""Model compression: quantization, pruning, low-rank factorization, weight sharing, distillation
(``px.compress``). Every method changes an ``nn.Module`` in place and returns it."""

from parallax.compress.common import calibration_tokens, target_linears

# quantization
from parallax.compress.quant_linear import QuantLinear
from parallax.compress.quantize import dequantize, quantize

__all__ = ["calibration_tokens", "target_linears"]
__all__ += ["QuantLinear", "dequantize", "quantize"]  # quantization
