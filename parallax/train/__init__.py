"""Training: the config, loop, checkpoints and metrics behind ``parallax train``."""

from parallax.train.config import ConfigError, TrainConfig
from parallax.train.loop import TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "train"]
