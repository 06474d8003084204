"""Model compression: quantization, pruning, low-rank factorization, weight sharing, distillation
(``px.compress``). Every method changes an ``nn.Module`` in place and returns it."""

from parallax.compress.common import calibration_tokens, target_linears
from parallax.compress.prune import prune  # pruning

__all__ = ["calibration_tokens", "target_linears"]
__all__ += ["prune"]  # pruning
