"""One training step's forward and backward, run on fake tensors: live activation bytes over time.

``trace_step`` runs ``loss_fn(model, idx, targets).backward()`` under
``torch._subclasses.FakeTensorMode`` on a fake copy of the model: every op computes only its
output's shape, dtype and strides, so neither memory nor time is spent, yet every op that a real
CPU step dispatches runs (the same kernel choices: SDPA picks the fused flash kernel, which saves
the output and the log-sum-exp rather than the T x T attention matrix; activation checkpointing
recomputes its blocks during backward). A ``TorchDispatchMode`` registers every storage an op
creates and samples the bytes of those still alive (weak references to the storages) after each
allocating op, so the timeline shows what autograd really keeps and frees: saved activations, the
transient outputs of each op, gradients flowing through backward, a recomputed block's
activations. Parameters and buffers are not counted (model states are accounted separately).

Events mark where the ZeRO runtime acts: each stage-3 unit's forward start and end, the start
and the end of its backward (the end: once the gradients of its inputs are computed, when its
inputs need them), and each parameter's gradient becoming complete (the post-accumulate-grad hook
where ``parallax.zero``'s reducer copies it into a flat buffer; the trace drops ``p.grad`` there,
as the reducer does). Matmul and attention FLOPs of forward and backward are counted on the way.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["ParamSpec", "StepTrace", "LossFn", "default_loss", "fake_copy", "trace_step", "synthetic_trace"]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

# event kinds of the timeline
FWD_PRE, FWD_POST, BWD_PRE, BWD_POST, GRAD, BACKWARD, END = ("fwd_pre", "fwd_post", "bwd_pre", "bwd_post", "grad",
                                                            "backward", "end")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter (tied parameters once): name, shape, whether it trains."""

    name: str
    shape: tuple[int, ...]
    requires_grad: bool

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class StepTrace:
    """The timeline of one forward + backward.

    ``timeline`` holds ``(live_bytes, kind, arg)`` in time order: ``kind`` is None for a plain
    sample after an allocating op, else an event (``fwd_pre``/``fwd_post``/``bwd_pre`` with the
    unit's index, 0 being the root; ``bwd_post`` with a non-root unit's index when its backward
    is over, for units whose inputs require grad; ``grad`` with the parameter's index, sampled
    while ``p.grad`` still exists, followed by a plain sample after it is dropped; ``backward``
    and ``end``).
    ``units`` lists the parameter indices of each stage-3 unit (index 0: the root, which holds
    every parameter no single repeated block owns), as ``px.zero.shard`` groups them.
    """

    params: list[ParamSpec]
    units: list[list[int]]
    timeline: list[tuple[int, str | None, int]] = field(default_factory=list)
    forward_flops: float = 0.0
    backward_flops: float = 0.0
    known: bool = True  # False for a synthetic trace (activations unknown: counted as 0)

    @property
    def saved_bytes(self) -> int:
        """Bytes alive when backward starts: what the forward keeps for backward (and the loss)."""
        for live, kind, _ in self.timeline:
            if kind == BACKWARD:
                return live
        return 0

    @property
    def peak_bytes(self) -> int:
        """The largest live activation bytes of the step (model states excluded)."""
        return max((live for live, _, _ in self.timeline), default=0)

    @property
    def flops(self) -> float:
        return self.forward_flops + self.backward_flops


# --------------------------------------------------------------------------------------------
# FLOPs of the ops that matter (matmuls and attention)


def _sdpa_cpu_flops(q: torch.Tensor, k: torch.Tensor, backward: bool) -> float:
    # q (B, H, T, D), k (B, Hkv, S, D): q k^T and p v are 2 B H T S D each; backward 4 such matmuls.
    b, h, t, d = q.shape
    s = k.shape[-2]
    return (8.0 if backward else 4.0) * b * h * t * s * d


def _op_flops(func, args, kwargs, out) -> float:
    from torch.utils.flop_counter import (
        flop_registry,  # imports triton: only when tracing
    )

    packet = getattr(func, "overloadpacket", None)
    if packet is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        return _sdpa_cpu_flops(args[0], args[1], backward=False)
    if packet is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        return _sdpa_cpu_flops(args[1], args[2], backward=True)  # (grad_out, q, k, v, ...)
    formula = flop_registry.get(packet)
    if formula is None:
        return 0.0
    try:
        return float(formula(*args, **kwargs, out_val=out))
    except Exception:  # a formula that does not know this overload's arguments: not counted
        return 0.0


# --------------------------------------------------------------------------------------------
# live bytes


class _Tracker(TorchDispatchMode):
    """Registers the storages ops create; ``sample()`` sums the bytes of those still alive."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude  # storages that exist anyway (parameters, buffers)
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.timeline: list[tuple[int, str | None, int]] = []
        self.flops = [0.0, 0.0]  # forward, backward
        self.phase = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.prim.device.default:
            return out
        self.flops[self.phase] += _op_flops(func, args, kwargs, out)
        new = False
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key in self.exclude:
                    continue
                known = self.live.get(key)
                if known is None or known[0].expired():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    new = True
        if new:
            self.sample()
        return out

    def bytes_alive(self) -> int:
        total = 0
        dead = []
        for key, (ref, nbytes) in self.live.items():
            if ref.expired():
                dead.append(key)
            else:
                total += nbytes
        for key in dead:
            del self.live[key]
        return total

    def sample(self, kind: str | None = None, arg: int = -1) -> None:
        self.timeline.append((self.bytes_alive(), kind, arg))


# --------------------------------------------------------------------------------------------
# the fake model


def fake_copy(model: nn.Module, mode, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake CPU tensors (no data is copied).

    Floating-point parameters and buffers take ``dtype`` when given (``model.to(dtype)``).
    """
    memo: dict[int, object] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        with mode:
            return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=target, device="cpu")

    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
    for b in model.buffers():
        if id(b) not in memo:
            memo[id(b)] = fake(b)
    return copy.deepcopy(model, memo)


def default_loss(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss of a language model on token ids ``idx`` (B, T) and ``targets`` (B, T).

    parallax's model families: ``model(idx, targets)``. A Hugging Face causal LM (its forward takes
    ``labels``): ``model(input_ids=idx, labels=targets).loss``. Anything else: ``model(idx)``,
    reduced to a scalar with ``.float().mean()`` if it is not one.
    """
    from parallax.models import GPT, Llama

    if isinstance(model, (GPT, Llama)):
        return model(idx, targets)
    import inspect

    try:
        takes_labels = "labels" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_labels = False
    if takes_labels:
        out = model(input_ids=idx, labels=targets)
        return out.loss if hasattr(out, "loss") else out[0]
    out = model(idx)
    if not isinstance(out, torch.Tensor):
        loss = getattr(out, "loss", None)
        out = loss if loss is not None else out[0]
    return out if out.dim() == 0 else out.float().mean()


def _unit_groups(model: nn.Module, names: dict[int, int]) -> list[list[int]]:
    from parallax.zero.module import _unit_params, default_units

    groups = _unit_params(model, default_units(model))
    return [[names[id(p)] for _, p in group] for group in groups]


@contextlib.contextmanager
def _hooks(model: nn.Module, params: list[nn.Parameter], tracker: _Tracker) -> Iterator[None]:
    from parallax.zero.gather import run_after_backward
    from parallax.zero.module import default_units

    handles = []
    blocks = default_units(model)
    armed: set[int] = set()

    def pre(u: int):
        def hook(module, args, kwargs):
            tracker.sample(FWD_PRE, u)
            if u == 0:
                return None
            return run_after_backward(lambda: tracker.sample(BWD_POST, u), args, kwargs)

        return hook

    def post(u: int):
        def hook(module, args, output):
            tracker.sample(FWD_POST, u)
            for t in tree_flatten(output)[0]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda g, u=u: arm(u))

        return hook

    def arm(u: int) -> None:
        if u not in armed:
            armed.add(u)
            tracker.sample(BWD_PRE, u)

    def grad_ready(i: int):
        def hook(p: torch.Tensor) -> None:
            tracker.sample(GRAD, i)  # p.grad still alive: the reducer copies it now
            p.grad = None
            tracker.sample()

        return hook

    handles.append(model.register_forward_pre_hook(pre(0), with_kwargs=True))
    for u, block in enumerate(blocks, start=1):
        handles.append(block.register_forward_pre_hook(pre(u), with_kwargs=True))
        handles.append(block.register_forward_hook(post(u)))
    for i, p in enumerate(params):
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(grad_ready(i)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def trace_step(model: nn.Module, micro_batch: int, seq_len: int, *, dtype: torch.dtype = torch.float32,
               checkpointing: str | None = None, loss_fn: LossFn | None = None) -> StepTrace:
    """Trace one forward + backward of ``model`` on (micro_batch, seq_len) token ids.

    ``model`` may hold real, meta or fake tensors; it is not modified (a fake copy in ``dtype``
    is traced, without any activation checkpointing already applied to it). ``checkpointing``:
    None for none, else a ``px.checkpoint.activation`` policy ("block", "every_n:K").
    ``loss_fn(model, idx, targets)`` returns the scalar loss (default: ``default_loss``).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from parallax.checkpoint.activation import activation, checkpointed_blocks

    mode = FakeTensorMode()
    fake = fake_copy(model, mode, dtype)
    for block in checkpointed_blocks(fake):  # the policy to trace is ours to apply
        del block.__dict__["forward"]
    if checkpointing is not None:
        quiet = logging.getLogger(activation.__module__)
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # its "checkpointing N blocks" note is about the fake copy
        try:
            activation(fake, checkpointing)
        finally:
            quiet.setLevel(level)
    fake.train()
    named = list(fake.named_parameters())
    params = [p for _, p in named]
    names = {id(p): i for i, p in enumerate(params)}
    specs = [ParamSpec(n, tuple(p.shape), p.requires_grad) for n, p in named]
    units = _unit_groups(fake, names)
    exclude = {t.untyped_storage()._cdata for t in list(fake.parameters()) + list(fake.buffers())}
    tracker = _Tracker(exclude)
    loss_fn = loss_fn or default_loss
    with _hooks(fake, params, tracker), mode, tracker:
        idx = torch.zeros(micro_batch, seq_len, dtype=torch.long)
        targets = torch.zeros(micro_batch, seq_len, dtype=torch.long)
        loss = loss_fn(fake, idx, targets)
        tracker.sample(BACKWARD)
        tracker.phase = 1
        loss.backward()
        del loss, idx, targets
        tracker.sample(END)
    return StepTrace(specs, units, tracker.timeline, tracker.flops[0], tracker.flops[1])


def synthetic_trace(num_params: int, layers: int = 1) -> StepTrace:
    """A trace without activations for a bare parameter count: ``layers`` equal blocks in a row.

    Forward visits the blocks in order, backward in reverse, and each block's gradient is
    complete at the end of its backward (then ``bwd_post``). With one layer the whole model is
    the root unit. Its FLOPs are unknown (0; ``known`` is False): the caller estimates them
    from the token count.
    """
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    base, extra = divmod(num_params, layers)
    sizes = [base + (1 if i < extra else 0) for i in range(layers)]
    specs = [ParamSpec(f"block{i}.weight", (n,), True) for i, n in enumerate(sizes)]
    units = [[]] + [[i] for i in range(layers)] if layers > 1 else [[0]]
    timeline: list[tuple[int, str | None, int]] = [(0, FWD_PRE, 0)]
    if layers > 1:
        for u in range(1, layers + 1):
            timeline += [(0, FWD_PRE, u), (0, FWD_POST, u)]
    timeline.append((0, BACKWARD, -1))
    for i in reversed(range(layers)):
        if layers > 1:
            timeline.append((0, BWD_PRE, i + 1))
        timeline += [(0, GRAD, i), (0, None, -1)]
        if layers > 1:
            timeline.append((0, BWD_POST, i + 1))
    timeline.append((0, END, -1))
    return StepTrace(specs, units, timeline, known=False)
