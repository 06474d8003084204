"""parallax: a thin runtime under PyTorch for training and serving LLMs in less memory, faster."""

from parallax import align, amp, checkpoint, compress, data, eval, inference, ops, optim, parallel, peft, planner, zero
from parallax._extension import build_info
from parallax.planner import plan
from parallax.runtime import initialize
from parallax.runtime_config import RuntimeConfig

__version__ = "0.1.0"

__all__ = ["align", "amp", "checkpoint", "compress", "data", "eval", "inference", "ops", "optim", "parallel", "peft", "planner", "zero", "RuntimeConfig", "initialize", "plan", "build_info",
           "__version__"]
