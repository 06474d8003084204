"""Model compression: quantization, pruning, low-rank factorization, weight sharing, distillation
(``px.compress``). Every method changes an ``nn.Module`` in place and returns it."""

from parallax.compress.common import calibration_tokens, target_linears
# distillation
from parallax.compress.distill import distill_loss, distill_loss_ref
from parallax.compress.distill_config import DistillConfig

__all__ = ["calibration_tokens", "target_linears"]
__all__ += ["distill_loss", "distill_loss_ref", "DistillConfig"]  # distillation
