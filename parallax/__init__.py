"""parallax: a thin runtime under PyTorch for training and serving LLMs in less memory, faster."""

from parallax import _extension, ops, optim
from parallax._extension import build_info

__version__ = "0.1.0"

__all__ = ["ops", "optim", "build_info", "__version__"]
