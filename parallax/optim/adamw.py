"""Drop-in replacement for ``torch.optim.AdamW`` backed by parallax's fused multi-tensor kernel."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from parallax.ops import adamw as adamw_op

__all__ = ["AdamW"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class AdamW(torch.optim.Optimizer):
    """AdamW with the constructor, semantics and state of ``torch.optim.AdamW``.

    One fused pass over memory per step: a C++ SIMD + OpenMP kernel for CPU tensors and a
    multi-tensor CUDA kernel for GPU tensors (``parallax.ops.backend("adamw", device)``).
    State keys are torch's (``step``, ``exp_avg``, ``exp_avg_sq``), so state dicts move freely
    between this optimizer and ``torch.optim.AdamW`` in both directions. Works with
    ``torch.optim.lr_scheduler``.

    ``master_weights=True`` is for bf16/fp16 parameters: the optimizer keeps an fp32 master copy
    (state key ``master_param``) and fp32 moments, updates them, and writes the rounded
    low-precision parameter in the same pass (as DeepSpeed's CPU Adam and BMTrain do). It has
    no effect on fp32 parameters. The master copy is taken from the parameter at its first
    step; to change weights afterwards, load them through ``load_state_dict``.

    Without master weights, bf16/fp16 parameters keep bf16/fp16 moments, as in torch; their
    update is computed in fp32 by the plain-PyTorch path. fp64 parameters are updated in fp64
    by that path, op for op as torch. Complex parameters are stepped as ``torch.view_as_real``
    views (their moments stay complex tensors in the state, as torch's).

    ``self.state`` is read as torch reads it: clearing it, assigning entries or tensors into it
    (as ``ZeroRedundancyOptimizer.load_state_dict`` does) or replacing it takes effect at the
    next step, which starts fresh moments for parameters that have none.

    ``foreach`` and ``fused`` are accepted for signature compatibility: this optimizer always
    runs its fused kernel, which computes the same update. ``amsgrad``, ``capturable`` and
    ``differentiable`` are not implemented and raise ``NotImplementedError``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
    ) -> None:
        for name, value in (("amsgrad", amsgrad), ("capturable", capturable), ("differentiable", differentiable)):
            if value:
                raise NotImplementedError(
                    f"parallax.optim.AdamW does not support {name}=True; use torch.optim.AdamW({name}=True)"
                )
        _check_hyperparameters(lr, betas, eps, weight_decay)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=maximize,
            foreach=foreach, capturable=False, differentiable=False, fused=fused,
            # torch.optim.AdamW records this; without it torch would load our groups as L2 Adam.
            decoupled_weight_decay=True, master_weights=master_weights,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._drop_plans()
        for group in self.param_groups:
            for key in ("amsgrad", "capturable", "differentiable"):
                if group.setdefault(key, False):
                    raise NotImplementedError(f"parallax.optim.AdamW cannot load a param group with {key}=True")
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", True)
            group.setdefault("master_weights", self.defaults.get("master_weights", False))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in ("amsgrad", "capturable", "differentiable"):
            if param_group.get(key, False):
                raise NotImplementedError(f"parallax.optim.AdamW does not support {key}=True")
        _check_hyperparameters(
            param_group.get("lr", self.defaults["lr"]),
            param_group.get("betas", self.defaults["betas"]),
            param_group.get("eps", self.defaults["eps"]),
            param_group.get("weight_decay", self.defaults["weight_decay"]),
        )
        super().add_param_group(param_group)
        self._drop_plans()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every floating state tensor to its parameter's dtype; fp32 master weights
        # and moments of low-precision parameters must stay fp32, so restore them after.
        saved_state = {
            index: {k: v for k, v in s.items() if k != "step" and torch.is_tensor(v)}
            for index, s in state_dict["state"].items()
        }
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        super().load_state_dict(state_dict)
        self._drop_plans()
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            if p.dtype not in _LOW_PRECISION or not self._group_of(p)["master_weights"]:
                continue
            for key, value in saved_state.get(saved_id, {}).items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Apply one AdamW update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # torch.optim.AdamW reads self.state afresh at every step, so changes made to it from
        # outside count (state.clear(), entries or tensors assigned as ZeroRedundancyOptimizer's
        # load_state_dict does, self.state replaced): the plans step the tensors they were built
        # from, so rebuild them when self.state no longer holds exactly those.
        seen = self.__dict__.get("_state_seen")
        changed = seen is None or not seen.matches(self.state)
        if changed:
            self._drop_plans()
        planned = [self._step_group(group) for group in self.param_groups]
        if changed or any(planned):  # a step that reuses every plan leaves the same objects in self.state
            self.__dict__["_state_seen"] = _StateSnapshot.of(self.state)
        return loss

    def _step_group(self, group: dict[str, Any]) -> bool:
        """Step one group; True when its plan was (re)built, which may have added to self.state."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return False
        plans = self.__dict__.setdefault("_plans", {})
        plan = plans.get(id(group))
        planned = plan is None or not plan.is_current(group, params)
        if planned:
            plan = plans[id(group)] = self._plan(group, params)
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        hyper = dict(beta1=float(beta1), beta2=float(beta2), eps=group["eps"], weight_decay=group["weight_decay"],
                     maximize=group["maximize"])
        for batch in plan.batches:
            grads = batch.gradients()
            batch.add_step()
            args = (batch.targets, grads, batch.exp_avgs, batch.exp_avg_sqs, batch.outs)
            if batch.kernel:
                adamw_op.fused_adamw_(*args, lr=float(lr), **hyper, step=batch.step)
            else:  # a tensor lr reaches the plain-PyTorch path as it is, as torch uses it
                adamw_op.adamw_(*args, lr=lr, **hyper, step=batch.step)
        return planned

    def _plan(self, group: dict[str, Any], params: list[torch.Tensor]) -> _Plan:
        """Initialise missing state and sort ``params`` into batches that one kernel call can take.

        Rebuilt whenever the set of parameters with gradients changes, and whenever ``self.state``
        changed since the last step (``step``, ``_StateSnapshot``). Complex parameters, their
        gradients and moments go to the kernels as ``torch.view_as_real`` views, as torch steps
        them; their state stays complex, as torch's.
        """
        batches: dict[tuple, _Batch] = {}
        for p in params:
            state = self.state[p]
            mixed = group["master_weights"] and p.dtype in _LOW_PRECISION
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_step_dtype())
                moment_dtype = torch.float32 if mixed else p.dtype
                state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
            if mixed and "master_param" not in state:
                state["master_param"] = p.detach().float()
            key = (p.device, float(state["step"]), mixed, p.is_complex())
            batch = batches.get(key)
            if batch is None:
                batch = batches[key] = _Batch(step=key[1], complex=key[3])
            batch.params.append(p)
            batch.targets.append(_real(state["master_param"] if mixed else p))
            batch.exp_avgs.append(_real(state["exp_avg"]))
            batch.exp_avg_sqs.append(_real(state["exp_avg_sq"]))
            if mixed:
                batch.outs.append(p)
        for (device, _, _, _), batch in batches.items():
            # One tensor holds the batch's step counts and each state["step"] becomes a 0-dim view
            # of it: one add_ per step instead of one per parameter (torch._foreach_add_ over 51
            # scalar tensors cost 69 us, a quarter of a 1M-parameter step). The state dict still
            # holds one scalar tensor per parameter, as torch's.
            batch.steps = torch.full((len(batch.params),), batch.step, dtype=_step_dtype())
            batch.steps_version = batch.steps._version
            for i, p in enumerate(batch.params):
                self.state[p]["step"] = batch.steps[i]
            batch.kernel = adamw_op.kernel_can_take(device, batch.targets, batch.exp_avgs, batch.exp_avg_sqs, batch.outs)
        return _Plan(group=group, params=params, batches=list(batches.values()))

    def _drop_plans(self) -> None:
        self.__dict__.pop("_plans", None)


def _step_dtype() -> torch.dtype:
    """The dtype torch.optim.AdamW gives state["step"] (fp64 only under an fp64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _real(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a complex tensor its real view (shape + (2,)), which shares its memory."""
    return torch.view_as_real(t) if t.is_complex() else t


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


@dataclass
class _StateSnapshot:
    """Which objects ``opt.state`` held after a step: the dict, its entries and their values.

    Compared by identity, in C loops (no Python code per parameter). Tensors changed in place
    are the same objects and need no rebuild; the step counts the plans cache as numbers are
    checked by ``_Batch.steps_unchanged``.
    """

    state: dict
    entries: list[dict[str, Any]]
    views: list[Any]  # entry.values() of each entry: live views, read again by matches()
    values: list[Any]

    @classmethod
    def of(cls, state: dict) -> _StateSnapshot:
        entries = list(state.values())
        views = list(map(dict.values, entries))
        return cls(state, entries, views, list(itertools.chain.from_iterable(views)))

    def matches(self, state: dict) -> bool:
        if state is not self.state or not _same_objects(list(state.values()), self.entries):
            return False
        return _same_objects(list(itertools.chain.from_iterable(self.views)), self.values)


@dataclass
class _Batch:
    """Tensors of one group that share device, step count, precision and complexness: one kernel call."""

    step: float
    complex: bool = False
    params: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)  # the fp32 master or the parameter (real view)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    outs: list[torch.Tensor] = field(default_factory=list)  # low-precision parameters in master mode
    steps: torch.Tensor | None = None  # (len(params),); state["step"] are views into it
    steps_version: int = 0  # steps._version after our last add_: any other in-place write moves it
    kernel: bool = False

    def gradients(self) -> list[torch.Tensor]:
        """The parameters' gradients as the kernels take them: dense, contiguous, real views."""
        grads = []
        for p in self.params:
            g = p.grad
            if g.is_sparse:
                raise RuntimeError("parallax.optim.AdamW does not support sparse gradients; use torch.optim.SparseAdam")
            grads.append(g if g.is_contiguous() else g.contiguous())
        return [torch.view_as_real(g) for g in grads] if self.complex else grads

    def add_step(self) -> None:
        self.steps.add_(1.0)  # every state["step"] of the batch is a view into this tensor
        self.step += 1
        self.steps_version = self.steps._version

    def steps_unchanged(self) -> bool:
        """False when a state["step"] of the batch was written in place from outside (e.g. reset to
        0): views share their base's version counter."""
        return self.steps._version == self.steps_version


@dataclass
class _Plan:
    """One group's batches, built for the parameters that had gradients."""

    group: dict[str, Any]
    params: list[torch.Tensor]
    batches: list[_Batch]

    def is_current(self, group: dict[str, Any], params: list[torch.Tensor]) -> bool:
        """True for the same group, the same parameters with gradients, and unchanged step counts."""
        if self.group is not group or not _same_objects(params, self.params):
            return False
        return all(batch.steps_unchanged() for batch in self.batches)


def _check_hyperparameters(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"lr as a Tensor must hold one element, got shape {tuple(lr.shape)}")
    if not 0.0 <= float(lr):
        raise ValueError(f"lr must be >= 0, got {float(lr)}")
    if not 0.0 <= eps:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1), got {betas}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
