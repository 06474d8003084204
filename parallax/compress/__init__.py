"""Model compression: quantization, pruning, low-rank factorization, weight sharing, distillation
(``px.compress``). Every method changes an ``nn.Module`` in place and returns it."""

from parallax.compress.common import calibration_tokens, target_linears
from parallax.compress.low_rank import LowRankLinear, low_rank

__all__ = ["calibration_tokens", "target_linears"]
__all__ += ["LowRankLinear", "low_rank"]
