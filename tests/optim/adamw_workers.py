"""Save, step on, load, step on: px.optim.AdamW inside ZeroRedundancyOptimizer (gloo ranks) and the
single-process torch.optim.AdamW reference of the same sequence."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

SIZES = (1, 7, 97, 1025)
BEFORE_SAVE, BEFORE_LOAD, AFTER_LOAD = 3, 10, 8
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def _steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], start: int, count: int) -> None:
    for step in range(start, start + count):
        gen = torch.Generator().manual_seed(1000 + step)
        for p in params:  # the same gradients on every rank, so no gradient reduction is needed
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def save_step_load(make_optimizer: Callable, save: Callable) -> list[torch.Tensor]:
    """Step, save the optimizer's state, step on, load the saved state, step on: the final parameters."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in SIZES]
    opt = make_optimizer(params)
    _steps(opt, params, 0, BEFORE_SAVE)
    saved = copy.deepcopy(save(opt))
    _steps(opt, params, BEFORE_SAVE, BEFORE_LOAD)
    opt.load_state_dict(saved)  # ZeroRedundancyOptimizer assigns the entries of its local optimizer's state
    _steps(opt, params, BEFORE_SAVE + BEFORE_LOAD, AFTER_LOAD)
    return [p.detach().clone() for p in params]


def torch_save_step_load() -> list[torch.Tensor]:
    return save_step_load(lambda params: torch.optim.AdamW(params, **HYPER), lambda opt: opt.state_dict())


def zero_redundancy_save_step_load(rank: int, world_size: int) -> list[torch.Tensor]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import parallax as px

    def make(params):
        return ZeroRedundancyOptimizer(params, optimizer_class=px.optim.AdamW, **HYPER)

    def save(opt):
        mine = None
        for target in range(world_size):  # the full state, consolidated on each rank in turn
            opt.consolidate_state_dict(to=target)
            if target == rank:
                mine = copy.deepcopy(opt.state_dict())
        return mine

    return save_step_load(make, save)
