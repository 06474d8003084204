"""Fused linear + cross-entropy: the loss of ``x @ weight.T`` without the (N, V) logits.

``linear_cross_entropy(x, weight, targets)`` equals
``F.cross_entropy(F.linear(x, weight, bias).float(), targets, ignore_index=..., reduction=...)``
(``linear_cross_entropy_ref``: logits rounded to the inputs' dtype by the matmul, then upcast to
fp32 before the softmax, as the models do), value and gradients, but never holds more than one
chunk of token rows' logits: the Liger-Kernel / Cut Cross-Entropy idea, which matters most for
128k-token vocabularies, where the fp32 logits of 8k tokens alone take 4 GiB.

The algorithm (Liger-Kernel's FusedLinearCrossEntropy), one chunk of token rows at a time:

1. ``logits = x_chunk @ weight.T (+ bias)`` into one reused (rows, V) buffer (torch matmul);
2. one pass per row computes the log-sum-exp and the loss, and overwrites the buffer in place
   with d loss / d logits = (softmax - onehot(target)) * scale (0 on ignored rows): the Triton
   kernel ``parallax.kernels.cross_entropy`` or the same math in PyTorch ('chunked');
3. ``grad_x[chunk] = dlogits @ weight`` and ``grad_weight += dlogits.T @ x_chunk`` (and
   ``grad_bias += dlogits.sum(0)``), accumulated in fp32 for 16-bit weights and rounded once
   (block by block, see _WEIGHT_GRAD_BLOCKS).

Gradients are computed during the forward, only for the inputs that need them (grad mode on and
``requires_grad``: a frozen lm_head, as under LoRA, costs no weight-gradient matmul), and saved;
the backward only multiplies them by the (scalar) grad_output, or with the usual grad_output of
exactly 1 hands them to autograd as they are. With ``reduction='none'`` the
output gradient is per row and must scale each row of dlogits *before* the rows are summed into
grad_weight, so the forward computes only the losses and the backward recomputes the chunks
with grad_output as the per-row scale (one more logits matmul per chunk; memory stays bounded).
fp16 inputs do the same for every reduction: d loss / d logits (~ softmax / N) lies below fp16's
smallest normal number at real sizes, so it must be multiplied by grad_output (the fp16 loss
scale) before it is rounded to fp16, as autograd through ``F.cross_entropy(logits.float())`` does.

Semantics follow ``F.cross_entropy``: 'mean' divides by the number of targets that are not
``ignore_index`` (NaN when there is none; the gradients are then 0), 'sum' adds, 'none' returns
(N,) with 0 on ignored rows. The loss is fp32 for every input dtype. Targets outside [0, V) that
are not ``ignore_index`` raise for CPU tensors; on CUDA they are not checked (that would cost a
host sync) and count as a target logit of 0. Autocast is not applied inside: the matmuls run in
the inputs' dtype (pass x and weight in the dtype the loss should use).

Dispatch (``parallax.ops.backend("linear_cross_entropy", device)``): CUDA tensors -> 'triton'
(cuBLAS matmuls, the Triton kernel for step 2); CPU tensors -> the same kernel under Triton's
interpreter when ``TRITON_INTERPRET=1`` is set (how the tests run it), else 'chunked' (the same
chunked algorithm in plain PyTorch: the default on CPU, where it saves the same memory).
``backend="chunked" | "triton" | "reference"`` forces one; 'reference' materialises the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from torch._subclasses.fake_tensor import is_fake

from parallax.ops import _triton

Tensor = torch.Tensor

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref", "backend", "KERNEL_DTYPES", "REDUCTIONS", "BACKENDS"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("chunked", "triton", "reference")

# Chunk size (``_chunk_rows``): at least as many token rows as make the chunk's logits as large as
# x itself (Liger-Kernel's rule: no more transient memory than the input activations, whatever the
# vocabulary), and at least a floor. On CUDA the floor is 1024 rows: each chunk's weight-gradient
# GEMM reads and writes the whole fp32 (V, C) accumulator, 8 bytes per weight against 2 * rows
# FLOPs, so it is bandwidth-bound below ~600 rows on an H100/H200 (ridge ~150 FLOP/byte); at
# 8k tokens x 128k vocabulary that is 256 MiB of bf16 logits per chunk instead of 2 GiB. On CPU
# the floor is 16 MiB of logits (a few large matmuls). At most half the rows, so that the full
# logits never exist, and a multiple of 128 (a matmul tile's height) when that leaves 128 or more.
_MIN_CHUNK_ROWS_CUDA = 1024
_MIN_CHUNK_BYTES_CPU = 16 << 20
# 16-bit weights: their gradient accumulates in fp32 in this many vocabulary blocks, each rounded to
# the weight's dtype (and its fp32 block freed) in turn at the end, so the peak is the fp32
# accumulator plus one block, not plus a whole 16-bit copy of the gradient.
_WEIGHT_GRAD_BLOCKS = 8
# Columns one kernel program reads per step: compiled, up to 8192 (16 KiB of bf16 per load, as
# wide as registers comfortably hold); interpreted, 128 (several blocks per row in the tests).
_BLOCK_V = 8192
_INTERPRETER_BLOCK_V = 128

# step(logits, targets, scale, loss, ignore_index, compute_grad): the per-chunk cross-entropy
Step = Callable[[Tensor, Tensor, Tensor, Tensor, int, bool], None]


# --------------------------------------------------------------------------------------------
# dispatch


def _triton_runs_on(device_type: str) -> bool:
    return _triton.default_backend(device_type) == "triton"


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation ``linear_cross_entropy`` uses by default for tensors on ``device``:
    'triton' (compiled on CUDA; interpreted on CPU under ``TRITON_INTERPRET=1``) or 'chunked'
    (the same chunked algorithm in plain PyTorch)."""
    return "triton" if _triton_runs_on(torch.device(device).type) else "chunked"


# --------------------------------------------------------------------------------------------
# checks


def _check(x: Any, weight: Any, targets: Any, bias: Any, ignore_index: Any, reduction: Any) -> None:
    name = "linear_cross_entropy"
    for arg, t in (("x", x), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name}: bias must be None or a torch.Tensor, got {type(bias).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D (tokens N, hidden C), got shape {tuple(x.shape)}; "
                         "flatten the leading dims first (x.flatten(0, -2), targets.flatten())")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"{name}: weight must be 2-D (vocab V >= 1, hidden C = {x.shape[1]}) to match x of shape "
                         f"{tuple(x.shape)}, got shape {tuple(weight.shape)}")
    if targets.shape != (x.shape[0],):
        raise ValueError(f"{name}: targets must have shape (N,) = ({x.shape[0]},) to match x, "
                         f"got {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"{name}: targets must be int64 class indices, got {targets.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name}: x has dtype {x.dtype}; supported: float16, bfloat16, float32 "
                         "(linear_cross_entropy_ref also takes float64)")
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name}: {arg} has dtype {t.dtype} but x has {x.dtype}; they must match")
    for arg, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but x is on {x.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{name}: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if targets.device.type == "cpu" and not is_fake(targets):  # free here (on CUDA it would cost a host sync)
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}: targets[{i}] = {int(targets[i])} is outside [0, V = {weight.shape[0]}) "
                             f"and is not ignore_index ({ignore_index})")


def _resolve_backend(requested: str | None, device: torch.device) -> str:
    if requested is None:
        return backend(device)
    if requested not in BACKENDS:
        raise ValueError(f"linear_cross_entropy: backend must be None or one of {', '.join(map(repr, BACKENDS))}, "
                         f"got {requested!r}")
    if requested == "triton" and not _triton_runs_on(device.type):
        raise ValueError(f"linear_cross_entropy: backend='triton' cannot run on {device}: it needs triton and a "
                         "CUDA device, or TRITON_INTERPRET=1 for CPU tensors")
    return requested


# --------------------------------------------------------------------------------------------
# the cross-entropy step of one chunk: loss per row, logits overwritten with d loss / d logits


def _step_torch(logits: Tensor, targets: Tensor, scale: Tensor, loss: Tensor, ignore_index: int,
                compute_grad: bool) -> None:
    """logits (rows, V) in the inputs' dtype; targets (rows,); scale (1,) or (rows,) fp32; loss
    (rows,) fp32, written. With ``compute_grad`` the logits are overwritten with
    (softmax - onehot) * scale, 0 on ignored rows."""
    counted = targets != ignore_index
    safe_targets = torch.where(counted, targets, 0)[:, None]
    z = logits.float()  # the buffer itself for fp32 logits, an fp32 copy of it for 16-bit ones
    lse = torch.logsumexp(z, dim=1)
    target_logit = z.gather(1, safe_targets)[:, 0]
    loss.copy_(torch.where(counted, lse - target_logit, 0.0))
    if not compute_grad:
        return
    # the scale is inf for 'mean' over no counted target: zeroed on ignored rows before it multiplies
    row_scale = torch.where(counted, scale.expand(counted.shape), 0.0)
    z.sub_(lse[:, None]).exp_()  # softmax, in place: z is the logits buffer (fp32) or a copy of it
    z.scatter_add_(1, safe_targets, -counted[:, None].to(z.dtype))
    z.mul_(row_scale[:, None])
    if z is not logits:
        logits.copy_(z)


def _step_triton(logits: Tensor, targets: Tensor, scale: Tensor, loss: Tensor, ignore_index: int,
                 compute_grad: bool) -> None:
    """``_step_torch`` as one Triton program per row (``parallax.kernels.cross_entropy``)."""
    kernels = _triton.kernels("linear_cross_entropy", "cross_entropy", logits.device)
    rows, vocab = logits.shape
    if rows == 0:
        return
    interpreted = logits.device.type == "cpu"  # CPU tensors meet Triton only under the interpreter
    block_v = min(_INTERPRETER_BLOCK_V if interpreted else _BLOCK_V, 1 << (vocab - 1).bit_length())
    num_warps = 4 if block_v <= 1024 else 8 if block_v <= 4096 else 16
    kernels._cross_entropy_fwd_bwd[(rows,)](
        logits, targets, loss, scale, logits.stride(0), 0 if scale.numel() == 1 else scale.stride(0), vocab,
        ignore_index, COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=num_warps)


# --------------------------------------------------------------------------------------------
# the chunked loop


def _chunk_rows(n: int, c: int, v: int, itemsize: int, device_type: str) -> int:
    """Token rows per chunk of n rows, x (n, c) and weight (v, c) of ``itemsize`` bytes (see
    _MIN_CHUNK_ROWS_CUDA)."""
    floor = _MIN_CHUNK_ROWS_CUDA if device_type == "cuda" else _MIN_CHUNK_BYTES_CPU // (v * itemsize)
    rows = min(max(n * c // v, floor, 1), -(-n // 2))
    return max(1, rows - rows % 128 if rows >= 128 else rows)


def _weight_grad_blocks(v: int) -> int:
    return min(_WEIGHT_GRAD_BLOCKS, v)


def _addmm_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b with products accumulated in fp32, for a and b of the weight's dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":  # 16-bit operands, fp32 output: no 16-bit temporary of acc's size
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # PyTorch's CPU matmuls have no out_dtype: upcast the operands (chunk-sized)
        acc.addmm_(a.float(), b.float())


class _WeightGrad:
    """The (V, C) weight gradient, accumulated in fp32 over the chunks: one fp32 tensor for fp32
    weights; for 16-bit weights ``_weight_grad_blocks`` vocabulary blocks, rounded one at a time."""

    def __init__(self, weight: Tensor) -> None:
        vocab, c = weight.shape
        blocks = 1 if weight.dtype == torch.float32 else _weight_grad_blocks(vocab)
        edges = [vocab * i // blocks for i in range(blocks + 1)]
        self.dtype = weight.dtype
        self.spans = list(zip(edges[:-1], edges[1:]))
        self.parts = [torch.zeros((hi - lo, c), dtype=torch.float32, device=weight.device) for lo, hi in self.spans]

    def add(self, dlogits: Tensor, x_chunk: Tensor) -> None:
        """+= dlogits.T @ x_chunk for dlogits (rows, V), x_chunk (rows, C)."""
        for (lo, hi), part in zip(self.spans, self.parts):
            _addmm_fp32(part, dlogits[:, lo:hi].t(), x_chunk)

    def result(self) -> Tensor:
        if self.dtype == torch.float32:
            return self.parts[0]
        rounded = []
        while self.parts:  # each fp32 block is freed as soon as its rounded copy exists
            rounded.append(self.parts.pop(0).to(self.dtype))
        return torch.cat(rounded)


def _run_chunks(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int,
                scale: Tensor, needs: tuple[bool, bool, bool],
                step: Step) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss per row (N,) fp32 and the gradients in ``needs`` (x, weight, bias; None where not
    needed) of sum_i scale_i * loss_i, one chunk of token rows at a time.

    x (N, C), weight (V, C), bias (V,) or None, targets (N,) int64 contiguous; scale (1,) fp32
    (one factor for every row) or (N,) fp32 (one per row)."""
    need_x, need_w, need_b = needs
    compute_grad = need_x or need_w or need_b
    n, c = x.shape
    vocab = weight.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    grad_x = torch.empty((n, c), dtype=x.dtype, device=x.device) if need_x else None
    grad_w = _WeightGrad(weight) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=x.device) if need_b else None
    rows = _chunk_rows(n, c, vocab, x.element_size(), x.device.type)
    buffer = torch.empty((min(rows, n), vocab), dtype=x.dtype, device=x.device)  # one chunk's logits, reused
    weight_t = weight.t()
    for start in range(0, n, rows):
        end = min(start + rows, n)
        x_chunk, logits = x[start:end], buffer[:end - start]
        if bias is None:
            torch.mm(x_chunk, weight_t, out=logits)
        else:
            torch.addmm(bias, x_chunk, weight_t, out=logits)
        chunk_scale = scale if scale.numel() == 1 else scale[start:end]
        step(logits, targets[start:end], chunk_scale, loss[start:end], ignore_index, compute_grad)
        if need_x:
            torch.mm(logits, weight, out=grad_x[start:end])
        if need_w:
            grad_w.add(logits, x_chunk)
        if need_b:
            grad_b.add_(logits.sum(0, dtype=torch.float32))
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return loss, grad_x, None if grad_w is None else grad_w.result(), grad_b


def _reduce(loss: Tensor, counted: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / counted if reduction == "mean" else total  # 0 / 0 = NaN, as F.cross_entropy


def _row_scale(counted: Tensor, reduction: str) -> Tensor:
    """The (1,) fp32 factor of every row's d loss / d logits: 1 / counted for 'mean', 1 for 'sum'."""
    one = torch.ones(1, dtype=torch.float32, device=counted.device)
    return one / counted if reduction == "mean" else one


class _LinearCrossEntropy(torch.autograd.Function):
    """'mean'/'sum': gradients computed in the forward, scaled by grad_output in the backward.
    'none', and fp16 inputs: the forward computes the losses only, the backward recomputes the
    chunks with grad_output as the (per-row) scale."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, ignore_index, reduction, step):
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.reduction = reduction
        counted = (targets != ignore_index).sum()
        # fp16 defers too: d loss / d logits is ~ p / N, which fp16 flushes to zero unless the
        # grad_output (the loss scale, 2**16 by default) multiplies it before it is rounded
        ctx.deferred = reduction == "none" or x.dtype == torch.float16
        if ctx.deferred:
            ctx.save_for_backward(x, weight, bias, targets, counted)
            ctx.ignore_index, ctx.step = ignore_index, step
            loss, *_ = _run_chunks(x, weight, bias, targets, ignore_index, _row_scale(counted, "sum"),
                                   (False, False, False), step)
            return _reduce(loss, counted, reduction)
        loss, grad_x, grad_w, grad_b = _run_chunks(x, weight, bias, targets, ignore_index,
                                                   _row_scale(counted, reduction), needs, step)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        return _reduce(loss, counted, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.deferred:
            x, weight, bias, targets, counted = ctx.saved_tensors
            scale = grad_output.float().contiguous() if ctx.reduction == "none" else \
                grad_output.float().reshape(1) * _row_scale(counted, ctx.reduction)
            _, grad_x, grad_w, grad_b = _run_chunks(x, weight, bias, targets, ctx.ignore_index, scale,
                                                    tuple(ctx.needs_input_grad[:3]), ctx.step)
        else:
            grad_x, grad_w, grad_b = ctx.saved_tensors
            # loss.backward() passes exactly 1: then autograd takes the saved gradients as they are,
            # without a weight-sized copy (the test costs one host sync on CUDA, as in Liger-Kernel)
            if not is_fake(grad_output) and bool(grad_output != 1):  # a trace (px.plan) sees the usual 1
                grad_x, grad_w, grad_b = (None if g is None else g * grad_output for g in (grad_x, grad_w, grad_b))
        return grad_x, grad_w, grad_b, None, None, None, None


# --------------------------------------------------------------------------------------------
# public functions


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         reduction: str = "mean", *, bias: Tensor | None = None,
                         backend: str | None = None) -> Tensor:
    """Cross-entropy of the logits ``x @ weight.T (+ bias)`` against ``targets``, without ever
    materialising the (N, V) logits, gradients included; differentiable in x, weight and bias.

    x (N, C), weight (V, C), bias (V,) or None: float16, bfloat16 or float32, one dtype, one
    device. targets (N,) int64 in [0, V) or ``ignore_index``. Returns fp32: a scalar for
    ``reduction`` 'mean' (over the targets that are not ignore_index; NaN if there is none) or
    'sum', the (N,) losses for 'none' (0 on ignored rows). Equals ``linear_cross_entropy_ref``.
    ``backend``: None (``parallax.ops.backend("linear_cross_entropy", x.device)``), 'triton',
    'chunked' or 'reference' (materialises the logits).
    """
    _check(x, weight, targets, bias, ignore_index, reduction)
    chosen = _resolve_backend(backend, x.device)
    if chosen == "reference":
        return linear_cross_entropy_ref(x, weight, targets, ignore_index, reduction, bias=bias)
    step = _step_triton if chosen == "triton" else _step_torch
    targets = targets.contiguous()
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if wants_grad:
        return _LinearCrossEntropy.apply(x, weight, bias, targets, ignore_index, reduction, step)
    counted = (targets != ignore_index).sum()
    loss, *_ = _run_chunks(x, weight, bias, targets, ignore_index, _row_scale(counted, "sum"),
                           (False, False, False), step)
    return _reduce(loss, counted, reduction)


def linear_cross_entropy_ref(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                             reduction: str = "mean", *, bias: Tensor | None = None) -> Tensor:
    """Plain PyTorch: ``F.cross_entropy(F.linear(x, weight, bias).float(), targets, ...)``, the (N, V)
    logits materialised. float64 inputs are computed (and returned) in float64: pass float64
    tensors for an exact reference."""
    logits = F.linear(x, weight, bias)
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
