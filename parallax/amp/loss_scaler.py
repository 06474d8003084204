"""``LossScaler``: dynamic loss scaling with GradScaler's API, DeepSpeed's hysteresis, ZeRO shards.

Usage is exactly ``torch.amp.GradScaler``'s::

    scaler = px.amp.LossScaler()
    scaler.scale(loss).backward()        # with ZeRO: opt.backward(scaler.scale(loss))
    scaler.unscale_(opt)                 # optional: before clipping
    clip...
    scaler.step(opt)                     # skipped on every rank when any rank saw inf/NaN
    scaler.update()

``unscale_`` multiplies every gradient by ``1 / scale`` and checks it for inf/NaN in one fused
pass per device (``parallax.ops.unscale_``): for ``parallax.zero.ZeroOptimizer`` over this rank's
flat gradient shards, for any other optimizer over ``p.grad`` of its param groups. The flag is
then made the maximum over ranks (the ZeRO optimizer's group, or the default group when
``torch.distributed`` is initialised), so all ranks skip a step together and their scales stay equal.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallax.ops.unscale import unscale_ as fused_unscale_
from parallax.validate import positive_int, positive_number

__all__ = ["LossScaler", "LossScaleError"]

_READY, _UNSCALED, _STEPPED = "ready", "unscaled", "stepped"
_NAMES_SHOWN = 20


class LossScaleError(RuntimeError):
    """Steps keep overflowing with the loss scale at its minimum: the loss or gradients are inf/NaN
    for a reason scaling cannot fix. ``parameters`` names those with non-finite gradients (all ranks)."""

    def __init__(self, message: str, parameters: list[str], scale: float, skips: int) -> None:
        super().__init__(message)
        self.parameters = parameters
        self.scale = scale
        self.skips = skips


def _check_settings(scale_name: str, scale: Any, growth_factor: Any, backoff_factor: Any, growth_interval: Any,
                    hysteresis: Any, min_scale: Any, max_consecutive_skips: Any) -> None:
    """The constructor's and ``load_state_dict``'s checks: ValueError naming the first bad field."""
    positive_number(scale_name, scale)
    positive_number("growth_factor", growth_factor, above_one=True)
    positive_number("backoff_factor", backoff_factor, below_one=True)
    positive_int("growth_interval", growth_interval)
    positive_int("hysteresis", hysteresis)
    positive_number("min_scale", min_scale)
    if max_consecutive_skips is not None:
        positive_int("max_consecutive_skips", max_consecutive_skips)


class LossScaler:
    """Dynamic loss scaling, ``torch.amp.GradScaler``-compatible.

    - Overflow (any inf/NaN gradient on any rank): the step is skipped on every rank. The scale is
      multiplied by ``backoff_factor`` (never below ``min_scale``) once ``hysteresis`` overflows
      have happened since the last growth (DeepSpeed's "delayed shift"); after that, every overflow
      backs off, until a growth restores the allowance. ``hysteresis=1`` is GradScaler's behaviour.
    - Growth: after ``growth_interval`` clean steps in a row the scale is multiplied by
      ``growth_factor`` (unless that overflows float), and the hysteresis counter resets.
    - At ``min_scale`` overflowing steps keep being skipped (DeepSpeed would exit on the first).
      A step that is skipped with the scale at ``min_scale`` when it makes ``max_consecutive_skips``
      skipped steps in a row raises ``LossScaleError`` from ``step()``, naming the parameters whose
      gradients are non-finite. Default 10: with no scaling left to remove, ten non-finite steps in
      a row mean the run diverged or met bad data; spinning on skipped steps would hide it.
      ``max_consecutive_skips=1`` raises on the first skip at ``min_scale`` (DeepSpeed's exit);
      ``None`` never raises (GradScaler's behaviour).

    Parameter names in that error: ``model`` (optional) supplies them for a plain optimizer;
    otherwise a param group's ``param_names`` (torch optimizers built from
    ``model.named_parameters()`` record them), else ``param_groups[g][i]``. A
    ``parallax.zero.ZeroOptimizer`` names its parameters itself, gathered from all ranks.

    ``state_dict()`` holds GradScaler's keys plus the hysteresis and skip counters, so state dicts
    load both ways between this class and ``torch.amp.GradScaler``.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 1000, hysteresis: int = 2, min_scale: float = 1.0,
                 max_consecutive_skips: int | None = 10, *, model: nn.Module | None = None) -> None:
        _check_settings("init_scale", init_scale, growth_factor, backoff_factor, growth_interval, hysteresis,
                        min_scale, max_consecutive_skips)
        if min_scale > init_scale:
            raise ValueError(f"min_scale must be <= init_scale ({init_scale!r}), got {min_scale!r}")
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.min_scale = float(min_scale)
        self.max_consecutive_skips = max_consecutive_skips
        self.model = model
        self._scale = float(init_scale)
        self._growth_tracker = 0  # clean steps in a row since the last growth or overflow
        self._hysteresis_tracker = hysteresis  # overflows still tolerated before a backoff
        self._consecutive_skips = 0  # skipped steps in a row
        self._per_optimizer: dict[int, dict[str, Any]] = {}

    # ---------------------------------------------------------------- GradScaler's API

    def is_enabled(self) -> bool:
        return True

    def get_scale(self) -> float:
        return self._scale

    def scale(self, outputs):
        """``outputs * scale`` in at least fp32: a tensor, or tensors nested in lists and tuples.

        A bf16/fp16 tensor is upcast first, as GradScaler and DeepSpeed do: the default scale
        2**16 is itself above fp16's largest value (65504), and a fp16 loss above 1 times it is inf.
        Backward casts the gradient back to the loss's dtype, so a fp16 loss still receives
        ``scale`` as its gradient: compute the loss in fp32 (``parallax.models.GPT`` does).
        """
        if isinstance(outputs, torch.Tensor):
            return outputs.to(torch.promote_types(outputs.dtype, torch.float32)) * self._scale
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise TypeError(f"scale() takes a tensor or a list/tuple of tensors, got {type(outputs).__name__}")

    @torch.no_grad()
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide ``optimizer``'s gradients by the scale in place and record whether any rank's hold
        inf/NaN. Optional: ``step`` calls it when it has not run since the last ``update``."""
        state = self._state(optimizer)
        if state["stage"] == _UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] == _STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        found_inf = self._unscale_grads(optimizer)
        state["found_inf"] = found_inf
        state["stage"] = _UNSCALED
        if self._next_overflow_raises() and found_inf.item():
            # Name the culprits now, before clipping (a NaN norm would smear NaN over every gradient).
            state["nonfinite"] = self._nonfinite_names(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """``optimizer.step(*args, **kwargs)`` unless a gradient on any rank is inf/NaN; then the
        step is skipped (returns None) and ``update`` backs the scale off."""
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if LossScaler is enabled.")
        if self.should_skip_step(optimizer):
            return None
        return optimizer.step(*args, **kwargs)

    def should_skip_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The decision ``step`` takes, for optimizers that run the scaler inside their own
        ``step()``: unscales the gradients if ``unscale_`` has not, marks this iteration's step as
        taken, and returns True when it must be skipped (every rank returns the same). Raises
        ``LossScaleError`` when this skip is one too many at ``min_scale``."""
        state = self._state(optimizer)
        if state["stage"] == _STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if state["stage"] == _READY:
            self.unscale_(optimizer)
        state["stage"] = _STEPPED
        if not state["found_inf"].item():  # the one host sync per step, as GradScaler's
            return False
        if self._next_overflow_raises():
            names = state["nonfinite"] if "nonfinite" in state else self._nonfinite_names(optimizer)
            raise self._error(names)
        return True

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Advance the scale after this iteration's ``step`` calls; ``new_scale`` sets it directly."""
        if new_scale is not None:
            value = float(new_scale.item() if isinstance(new_scale, torch.Tensor) else new_scale)
            positive_number("new_scale", value)
            self._scale = value
        else:
            flags = [s["found_inf"] for s in self._per_optimizer.values() if "found_inf" in s]
            if not flags:
                raise RuntimeError("No inf checks were recorded prior to update(): call step() (or unscale_()) first.")
            self._advance(overflow=any(bool(f.item()) for f in flags))
        self._per_optimizer = {}

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self._scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self._growth_tracker,
                "hysteresis": self.hysteresis, "_hysteresis_tracker": self._hysteresis_tracker,
                "min_scale": self.min_scale, "max_consecutive_skips": self.max_consecutive_skips,
                "_consecutive_skips": self._consecutive_skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.amp.GradScaler`` (then the hysteresis and
        skip counters start fresh)."""
        if not state_dict:
            raise RuntimeError("The source state dict is empty, possibly because it was saved from a disabled "
                               "GradScaler.")
        get = state_dict.get
        scale = float(state_dict["scale"])
        growth_factor = get("growth_factor", self.growth_factor)
        backoff_factor = get("backoff_factor", self.backoff_factor)
        growth_interval = get("growth_interval", self.growth_interval)
        hysteresis = get("hysteresis", self.hysteresis)
        min_scale = get("min_scale", self.min_scale)
        max_skips = get("max_consecutive_skips", self.max_consecutive_skips)
        _check_settings("scale", scale, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale,
                        max_skips)
        if scale < min_scale:
            raise ValueError(f"the state dict's scale {scale!r} is below min_scale {min_scale!r}")
        self._scale, self.min_scale, self.max_consecutive_skips = scale, float(min_scale), max_skips
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self._growth_tracker = int(get("_growth_tracker", 0))
        self._hysteresis_tracker = int(get("_hysteresis_tracker", hysteresis))
        self._consecutive_skips = int(get("_consecutive_skips", 0))
        self._per_optimizer = {}

    # ---------------------------------------------------------------- the schedule

    def _advance(self, overflow: bool) -> None:
        if overflow:
            self._consecutive_skips += 1
            self._growth_tracker = 0
            self._hysteresis_tracker = max(self._hysteresis_tracker - 1, 0)
            if self._hysteresis_tracker == 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
            return
        self._consecutive_skips = 0
        self._growth_tracker += 1
        if self._growth_tracker >= self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            grown = self._scale * self.growth_factor
            if math.isfinite(grown):
                self._scale = grown

    def _next_overflow_raises(self) -> bool:
        """Whether an overflow in this iteration, skipped at the current scale, ends the run."""
        return (self.max_consecutive_skips is not None and self._scale <= self.min_scale
                and self._consecutive_skips + 1 >= self.max_consecutive_skips)

    def _error(self, names: list[str]) -> LossScaleError:
        skips = self._consecutive_skips + 1
        shown = ", ".join(names[:_NAMES_SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > _NAMES_SHOWN else "")
        where = f"non-finite gradients in: {shown}" if names else "no gradient is non-finite any more (zeroed?)"
        return LossScaleError(
            f"LossScaler: {skips} steps in a row skipped for inf/NaN gradients, the last at the minimum loss scale "
            f"{self._scale:g}; {where}. Scaling cannot fix this: check the data, the learning rate and the model "
            f"for values that overflow (max_consecutive_skips={self.max_consecutive_skips}).",
            names, self._scale, skips)

    # ---------------------------------------------------------------- gradients

    def _state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return self._per_optimizer.setdefault(id(optimizer), {"stage": _READY})

    def _unscale_grads(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Unscale every gradient (one fused call per device); the found-inf flag, max over ranks."""
        zero = hasattr(optimizer, "grad_shards")
        grads = list(optimizer.grad_shards()) if zero else [g for _, g in self._plain_grads(optimizer)]
        home = grads[0].device if grads else _first_device(optimizer)
        found_inf = torch.zeros(1, dtype=torch.float32, device=home)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        inv_scale = 1.0 / self._scale
        for device, group in by_device.items():
            flag = found_inf if device == home else torch.zeros(1, dtype=torch.float32, device=device)
            fused_unscale_(group, flag, inv_scale)
            if flag is not found_inf:
                torch.maximum(found_inf, flag.to(home), out=found_inf)
        if zero:
            optimizer.all_reduce_found_inf(found_inf)
        elif _world_size() > 1:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        return found_inf

    def _plain_grads(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
        """(name, dense gradient values) of every parameter of ``optimizer`` that has a gradient."""
        known = {id(p): n for n, p in self.model.named_parameters()} if self.model is not None else {}
        out = []
        for gi, group in enumerate(optimizer.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = known.get(id(p)) or (names[i] if names and i < len(names) else f"param_groups[{gi}][{i}]")
                if p.grad.is_sparse:
                    p.grad = p.grad.coalesce()
                    out.append((name, p.grad._values()))
                else:
                    out.append((name, p.grad))
        return out

    def _nonfinite_names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """Sorted names of the parameters whose gradient holds inf/NaN on any rank (a collective
        under torch.distributed: every rank calls it in the same step, as found_inf agrees)."""
        if hasattr(optimizer, "nonfinite_parameters"):
            return list(optimizer.nonfinite_parameters())
        names = sorted({n for n, g in self._plain_grads(optimizer) if not bool(torch.isfinite(g).all())})
        if _world_size() > 1:
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, names)
            names = sorted(set().union(*everyone))
        return names


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _first_device(optimizer: torch.optim.Optimizer) -> torch.device:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")
