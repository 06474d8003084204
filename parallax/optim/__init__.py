"""Drop-in ``torch.optim.Optimizer`` subclasses backed by parallax's fused kernels."""

from parallax.optim.adamw import AdamW

__all__ = ["AdamW"]
