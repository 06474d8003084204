"""Batched multi-LoRA: each token's low-rank update through its own adapter, in one call
(Punica's SGMV, "segmented gather matrix-vector"), so one batch mixes requests for different
adapters and the base model without merging any adapter into the weights.

    delta[t] = scaling[i] * (x[t] @ lora_a[i].T) @ lora_b[i].T    with i = indices[t]
    delta[t] = 0                                                  where indices[t] == -1 (the base model)

Shapes: T tokens, K input features, N output features, S adapter slots, R rank (adapters of
lower rank are zero-padded to R: the padding adds nothing).

x (T, K); lora_a (S, R, K); lora_b (S, N, R); indices (T,) int32 or int64 in [-1, S); scaling (S,)
floating. x, lora_a and lora_b are fp16, bf16 or fp32 (lora_a and lora_b share a dtype; x is cast
to it, as PEFT runs the LoRA path in the adapter dtype). Returns delta (T, N) in lora_a's dtype.

``sgmv_add_(y, ...)`` adds the update into y (T, N) in place instead (Punica's add_lora; on CPU
without a (T, N) update tensor): what each ``LoraLinear`` of the inference engine calls.

Inference only: ``sgmv`` runs under ``torch.no_grad`` (its result has no autograd graph).

Three implementations, chosen with ``backend=``:

* ``"cpu"``: C++ in ``csrc/sgmv/`` (``torch.ops.parallax.sgmv``), CPU tensors, when the compiled
  extension loaded. It sorts the tokens by slot on the host (a counting sort; the range check
  comes free with it), cuts each slot's run into tiles of 16 tokens, then a shrink ``u = scaling[s]
  * x_tile @ A[s]^T`` (fp32) and an expand ``delta[tile] = u @ B[s]^T`` (fp32 accumulation, rounded
  once), with the AVX-512, AVX2 or scalar kernels of ``parallax._extension.cpu_isa()``: T * R *
  (K + N) multiply-adds and one pass over x and delta. Calls past 2M multiply-adds are spread over
  the OpenMP threads; smaller ones (decode steps) run on the calling thread, which is as fast there
  and never waits for a descheduled thread on a busy machine.
  lora_b is read fastest with its N dim contiguous (a contiguous (S, R, N) tensor passed as
  ``.transpose(1, 2)``: what ``parallax.inference.lora`` keeps); another layout is copied into that
  one on every call. ``plan`` is not needed (it is accepted and checked against the call).
* ``"triton"``: ``parallax/kernels/sgmv.py``; on CUDA tensors, or on CPU tensors under the Triton
  interpreter (``TRITON_INTERPRET=1``, the tests). It sorts the tokens by slot, cuts each slot's
  segment into row tiles and runs two kernels: a shrink ``u = x_seg @ A[slot]^T`` (fp32, in sorted
  order) and an expand ``delta[tokens] = scaling[slot] * u @ B[slot]^T`` (fp32 accumulation,
  rounded once). The grid is sized from T and S alone, so nothing is read back to the host but the
  indices' range check; ``sgmv_plan`` does that sort, cut and check once for the many layers of one
  model step (``sgmv(..., plan=plan)``).
* ``"reference"``: ``sgmv_ref``, plain PyTorch (a gather and two matmuls per slot present).

The default (``parallax.ops.backend("sgmv", device)``): on CPU ``"cpu"`` when compiled, else
``"triton"`` under the interpreter, else ``"reference"``; on CUDA ``"triton"``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from parallax import _extension
from parallax.ops import _triton

Tensor = torch.Tensor

__all__ = ["sgmv", "sgmv_add_", "sgmv_ref", "sgmv_plan", "SgmvPlan", "backend", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
BACKENDS = ("cpu", "triton", "reference")

if _extension.available() and hasattr(torch.ops.parallax, "sgmv"):

    @torch.library.register_fake("parallax::sgmv")
    def _sgmv_fake(x, lora_a, lora_b, indices, scaling):
        return x.new_empty((x.shape[0], lora_b.shape[1]), dtype=lora_a.dtype)

if _extension.available() and hasattr(torch.ops.parallax, "sgmv_add_"):

    @torch.library.register_fake("parallax::sgmv_add_")
    def _sgmv_add_fake(y, x, lora_a, lora_b, indices, scaling):
        return None


@functools.cache  # the extension's kernels are registered once, at import
def _has_cpu_kernel() -> bool:
    try:
        return _extension.has_kernel("sgmv", "cpu") and _extension.has_kernel("sgmv_add_", "cpu")
    except RuntimeError:  # an extension built before these ops existed
        return False


def _available(device_type: str) -> list[str]:
    """Implementations that can run on ``device_type``, best first."""
    found = ["cpu"] if device_type == "cpu" and _has_cpu_kernel() else []
    if _triton.default_backend(device_type) == "triton":
        found.append("triton")
    return found + ["reference"]


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation ``sgmv`` uses by default for tensors on ``device``: 'cpu', 'triton' or
    'reference'."""
    return _available(torch.device(device).type)[0]


def _pick(requested: str | None, device: torch.device) -> str:
    if requested is None and device.type == "cpu" and _has_cpu_kernel():
        return "cpu"  # the common case first, without building the list
    available = _available(device.type)
    if requested is None:
        return available[0]
    if requested not in BACKENDS:
        raise ValueError(f"sgmv: backend must be one of {', '.join(map(repr, BACKENDS))} or None, got {requested!r}")
    if requested not in available:
        why = {"cpu": "the C++ kernel runs on CPU tensors when parallax._C loaded with it",
               "triton": "Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before the "
                         "kernels are first used)"}[requested]
        raise ValueError(f"sgmv: backend={requested!r} cannot run on {device.type} tensors here ({why}); "
                         f"available: {', '.join(available)}")
    return requested


# --------------------------------------------------------------------------------------------
# checks


def _check(x: Tensor, lora_a: Tensor, lora_b: Tensor, indices: Tensor, scaling: Tensor) -> None:
    named = {"x": x, "lora_a": lora_a, "lora_b": lora_b, "indices": indices, "scaling": scaling}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sgmv: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"sgmv: {name} is on {t.device} but x is on {x.device}")
    for name in ("x", "lora_a", "lora_b"):
        if named[name].dtype not in KERNEL_DTYPES:
            raise ValueError(f"sgmv: {name} has dtype {named[name].dtype}; supported: float16, bfloat16, float32")
    if lora_b.dtype != lora_a.dtype:
        raise ValueError(f"sgmv: lora_b has dtype {lora_b.dtype} but lora_a has {lora_a.dtype}; "
                         "they must share a dtype")
    if x.dim() != 2:
        raise ValueError(f"sgmv: x must have shape (T, K), got {tuple(x.shape)}")
    t, k = x.shape
    if lora_a.dim() != 3 or lora_a.shape[2] != k or lora_a.shape[1] < 1:
        raise ValueError(f"sgmv: lora_a must have shape (S, R, K) with R >= 1 and K={k} (x's last dim), "
                         f"got {tuple(lora_a.shape)}")
    s, r, _ = lora_a.shape
    if lora_b.dim() != 3 or lora_b.shape[0] != s or lora_b.shape[2] != r:
        raise ValueError(f"sgmv: lora_b must have shape (S, N, R) with S={s} and R={r} (lora_a's), "
                         f"got {tuple(lora_b.shape)}")
    if tuple(scaling.shape) != (s,) or not scaling.dtype.is_floating_point:
        raise ValueError(f"sgmv: scaling must be a floating tensor of shape (S,) = ({s},), "
                         f"got {scaling.dtype} {tuple(scaling.shape)}")
    _check_indices(indices, t)


def _check_indices(indices: Tensor, num_tokens: int | None) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"sgmv: indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise ValueError(f"sgmv: indices has dtype {indices.dtype}; supported: int32, int64")
    if indices.dim() != 1 or (num_tokens is not None and indices.shape[0] != num_tokens):
        expected = "(T,)" if num_tokens is None else f"(T,) = ({num_tokens},) (x's rows)"
        raise ValueError(f"sgmv: indices must have shape {expected}, got {tuple(indices.shape)}")


def _check_range(indices: Tensor, num_slots: int) -> None:
    """Every index in [-1, num_slots) (one read-back to the host)."""
    if indices.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(indices)).tolist()
    if low < -1 or high >= num_slots:
        raise ValueError(f"sgmv: indices must lie in [-1, {num_slots}) (-1: no adapter; else a slot of the "
                         f"{num_slots} in lora_a), got values in [{low}, {high}]")


# --------------------------------------------------------------------------------------------
# plan: the tokens sorted by slot and cut into row tiles


@dataclass(frozen=True)
class SgmvPlan:
    """The row tiles of one ``indices`` (see ``sgmv_plan``): valid for every ``sgmv`` call with
    those indices and ``num_slots`` adapter slots, whatever x's and the adapters' K, N and R.

    ``order`` (T,) int64: the tokens sorted by slot (stable); tile g covers sorted positions
    ``[tile_start[g], tile_end[g])``, all of slot ``tile_slot[g]`` ((G,) int32 each; spare tiles
    have an empty range)."""

    num_tokens: int
    num_slots: int
    block_m: int
    order: Tensor
    tile_slot: Tensor
    tile_start: Tensor
    tile_end: Tensor


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, 1 << (max(n, 1) - 1).bit_length()))


def sgmv_plan(indices: Tensor, num_slots: int) -> SgmvPlan:
    """Sort the tokens of ``indices`` (T,) (int32/int64 in [-1, num_slots)) by adapter slot and cut
    each slot's segment into tiles of ``block_m`` rows, on indices' device. Checks the range (one
    read-back to the host); the rest runs on the device without a synchronisation: the grid has
    ``min(T, cdiv(T, block_m) + num_slots)`` tiles, an upper bound of what the segments need."""
    _check_indices(indices, None)
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 0:
        raise ValueError(f"sgmv: num_slots must be an int >= 0, got {num_slots!r}")
    _check_range(indices, num_slots)
    return _plan(indices, num_slots)


def _plan(indices: Tensor, num_slots: int) -> SgmvPlan:
    t, device = indices.shape[0], indices.device
    if t == 0 or num_slots == 0:  # no token has an adapter (the range check saw to it)
        empty = torch.empty(0, dtype=torch.int32, device=device)
        return SgmvPlan(t, num_slots, 16, torch.arange(t, device=device), empty, empty, empty)
    # rows per tile: 16 (tl.dot's least) for the few tokens per adapter of decode batches, up to 64
    # when T / S (a lower bound of the mean segment length) says segments are long (prefill)
    block_m = _pow2(-(-t // max(num_slots, 1)), 16, 64)
    idx = indices.long()
    order = torch.argsort(idx, stable=True)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
    counts.index_add_(0, idx + 1, torch.ones_like(idx))  # bincount would read its size back to the host
    seg_end = counts.cumsum(0)[1:]  # slot s's tokens: sorted positions [seg_end[s] - seg_len[s], seg_end[s])
    seg_len = counts[1:]
    tiles = (seg_len + block_m - 1) // block_m
    tiles_end = tiles.cumsum(0)
    grid = min(t, -(-t // block_m) + num_slots)
    g = torch.arange(grid, device=device)
    tile_slot = torch.searchsorted(tiles_end, g, right=True)  # num_slots for spare tiles
    slot = tile_slot.clamp(max=max(num_slots - 1, 0))
    start = seg_end[slot] - seg_len[slot] + (g - tiles_end[slot] + tiles[slot]) * block_m
    end = torch.minimum(start + block_m, seg_end[slot])
    spare = tile_slot >= num_slots
    start = start.masked_fill(spare, 0)
    end = end.masked_fill(spare, 0)
    return SgmvPlan(t, num_slots, block_m, order, slot.int(), start.int(), end.int())


# --------------------------------------------------------------------------------------------
# launcher


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit operands


def _sgmv_triton(x: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: Tensor, plan: SgmvPlan) -> Tensor:
    kernels = _triton.kernels("sgmv", "sgmv", x.device)
    (t, k), r, n = x.shape, lora_a.shape[1], lora_b.shape[1]
    out = torch.zeros((t, n), dtype=lora_a.dtype, device=x.device)  # rows without an adapter stay 0
    grid = plan.tile_slot.shape[0]
    if out.numel() == 0 or grid == 0:
        return out
    u = torch.empty((t, r), dtype=torch.float32, device=x.device)  # in sorted order
    wide = x.device.type == "cuda" and lora_a.dtype != torch.float32
    block_r = _pow2(r, 16, 64)
    block_k = 64 if lora_a.dtype != torch.float32 else 32
    block_n = _pow2(n, 16, 128 if wide else 64)
    precision = _dot_precision(lora_a.dtype)
    scaling = scaling.contiguous()
    tiles = (plan.order, plan.tile_slot, plan.tile_start, plan.tile_end)
    kernels._sgmv_shrink[(grid, -(-r // block_r))](
        x, lora_a, u, *tiles, k, r, x.stride(0), x.stride(1), *lora_a.stride(), u.stride(0), u.stride(1),
        DOT_PRECISION=precision, BLOCK_M=plan.block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4)
    kernels._sgmv_expand[(grid, -(-n // block_n))](
        u, lora_b, scaling, out, *tiles, n, r, u.stride(0), u.stride(1), *lora_b.stride(), out.stride(0),
        out.stride(1), DOT_PRECISION=precision, BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        num_warps=8 if plan.block_m * block_n >= 64 * 128 else 4)
    return out


# --------------------------------------------------------------------------------------------
# public function and reference


def sgmv(x: Tensor, lora_a: Tensor, lora_b: Tensor, indices: Tensor, scaling: Tensor, *,
         backend: str | None = None, plan: SgmvPlan | None = None) -> Tensor:
    """Each token's LoRA update through its own adapter slot (see the module docstring):
    x (T, K), lora_a (S, R, K), lora_b (S, N, R), indices (T,) in [-1, S), scaling (S,) ->
    delta (T, N) in lora_a's dtype, zero where indices is -1. Inference only (no autograd graph).

    ``backend``: 'cpu', 'triton', 'reference' or None (the default for the device, see ``backend``).
    ``plan``: ``sgmv_plan(indices, S)``, made once and reused by every call with these indices
    (it skips the indices' range check and sort); None makes one per call. The 'cpu' kernel sorts
    and checks on its own (cheaper than a plan there): a plan is only checked against the call.
    """
    if torch.is_grad_enabled():  # entered only when needed: the engine calls this ~30 times a step
        with torch.no_grad():
            return _sgmv(x, lora_a, lora_b, indices, scaling, backend, plan)
    return _sgmv(x, lora_a, lora_b, indices, scaling, backend, plan)


def _sgmv(x: Tensor, lora_a: Tensor, lora_b: Tensor, indices: Tensor, scaling: Tensor, backend: str | None,
          plan: SgmvPlan | None) -> Tensor:
    _check(x, lora_a, lora_b, indices, scaling)
    num_slots = lora_a.shape[0]
    if plan is not None:
        if not isinstance(plan, SgmvPlan):
            raise TypeError(f"sgmv: plan must be an SgmvPlan (from sgmv_plan) or None, got {type(plan).__name__}")
        if (plan.num_tokens, plan.num_slots) != (x.shape[0], num_slots) or plan.order.device != x.device:
            raise ValueError(f"sgmv: plan was made for {plan.num_tokens} tokens and {plan.num_slots} slots on "
                             f"{plan.order.device}; this call has {x.shape[0]} tokens (x) and {num_slots} slots "
                             f"(lora_a) on {x.device}")
    chosen = _pick(backend, x.device)
    if chosen == "cpu":
        return torch.ops.parallax.sgmv(x, lora_a, lora_b, indices, scaling)  # ValueError for indices out of range
    if chosen == "reference":
        if plan is None:
            _check_range(indices, num_slots)
        return sgmv_ref(x, lora_a, lora_b, indices, scaling)
    return _sgmv_triton(x, lora_a, lora_b, scaling, plan if plan is not None else sgmv_plan(indices, num_slots))


def sgmv_add_(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, indices: Tensor, scaling: Tensor, *,
              backend: str | None = None, plan: SgmvPlan | None = None) -> Tensor:
    """``y += sgmv(x, lora_a, lora_b, indices, scaling)`` in place (Punica's add_lora); returns y.

    y (T, N) float16, bfloat16 or float32 on x's device, whatever the adapters' dtype: each element
    is the fp32 sum of y and the update, rounded once to y's dtype (as ``(y + delta).to(y.dtype)``).
    The 'cpu' kernel adds each adapted token's update into its row of y (N contiguous; another
    layout goes through ``sgmv``'s result): no (T, N) update tensor, no separate add pass, the base
    tokens' rows untouched. That pass cost the engine's decode step a write and a re-read of a
    fresh (T, N) tensor per layer. The other backends add ``sgmv``'s result. Other arguments as
    ``sgmv``'s. Inference only."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"sgmv_add_: y must be a torch.Tensor, got {type(y).__name__}")
    _check(x, lora_a, lora_b, indices, scaling)
    if y.device != x.device:
        raise ValueError(f"sgmv_add_: y is on {y.device} but x is on {x.device}")
    if y.dtype not in KERNEL_DTYPES:
        raise ValueError(f"sgmv_add_: y has dtype {y.dtype}; supported: float16, bfloat16, float32")
    expected = (x.shape[0], lora_b.shape[1])
    if tuple(y.shape) != expected:
        raise ValueError(f"sgmv_add_: y must have shape (T, N) = {expected} (x's rows, lora_b's N), "
                         f"got {tuple(y.shape)}")
    with torch.no_grad():
        if _pick(backend, x.device) == "cpu" and (y.stride(1) == 1 or y.shape[1] <= 1):
            torch.ops.parallax.sgmv_add_(y, x, lora_a, lora_b, indices, scaling)
            return y
        return y.add_(_sgmv(x, lora_a, lora_b, indices, scaling, backend, plan))


def sgmv_ref(x: Tensor, lora_a: Tensor, lora_b: Tensor, indices: Tensor, scaling: Tensor) -> Tensor:
    """Plain PyTorch: the tokens of each adapter present gathered, two matmuls, scattered back."""
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=lora_a.dtype, device=x.device)
    for slot in torch.unique(indices).tolist():
        if slot < 0:
            continue
        rows = (indices == slot).nonzero(as_tuple=True)[0]
        h = x.index_select(0, rows).to(lora_a.dtype)
        out.index_copy_(0, rows, (h @ lora_a[slot].T) @ lora_b[slot].T * scaling[slot].to(lora_a.dtype))
    return out
