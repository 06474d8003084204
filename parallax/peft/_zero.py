"""What adapter saving needs to know about a model under ``px.zero.shard``."""

from torch import nn


def zero_stage(model: nn.Module) -> int | None:
    """The ZeRO stage model is sharded with, or None."""
    state = getattr(model, "_parallax_zero", None)
    return None if state is None else state.stage


def is_writer(model: nn.Module) -> bool:
    """Whether this process writes files for model: rank 0 of its ZeRO group, or a lone process."""
    state = getattr(model, "_parallax_zero", None)
    return state is None or state.comm.rank == 0
