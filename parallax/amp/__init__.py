"""Mixed precision: dynamic loss scaling (``LossScaler``) over plain and ZeRO-sharded gradients."""

from parallax.amp.loss_scaler import LossScaleError, LossScaler

__all__ = ["LossScaler", "LossScaleError"]
