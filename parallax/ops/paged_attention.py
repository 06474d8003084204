"""PagedAttention decode and the paged KV-cache write: launchers, checks, dispatch, references.

``paged_attention`` attends one new query token per sequence over that sequence's keys and
values, which live in fixed-size blocks of a shared cache, found through a block table (vLLM's
layout). ``reshape_and_cache`` writes new tokens' keys and values into their cache slots.

Implementations, chosen with ``backend=``:

* ``"cuda"``: CUDA C++ in ``csrc/paged_attention/`` (``torch.ops.parallax.*``), CUDA tensors only.
* ``"cpu"``: C++ in ``csrc/paged_attention/paged_attention_cpu*.cpp`` (``paged_attention`` only),
  CPU tensors only: one OpenMP task per (sequence, KV head) reads each key and value row once
  for the KV head's G query heads, SIMD per ``parallax._extension.cpu_isa()``, fp32 accumulation.
  It ignores ``partition_size`` (split-K exists to fill a GPU; a batch's tasks outnumber cores).
* ``"triton"``: ``parallax/kernels/paged_attention.py``; on CUDA tensors, or on CPU tensors under
  the Triton interpreter (``TRITON_INTERPRET=1``, the tests).
* ``"reference"``: ``paged_attention_ref`` / ``reshape_and_cache_ref``, plain PyTorch.

The default on CUDA is ``DEFAULT_CUDA_BACKEND`` when that kernel is available (the one constant
to change once the GPU benchmark has measured both), else the other one; on CPU the compiled CPU
kernel when ``parallax._C`` has it, else the Triton kernel under the interpreter, else the
reference. ``parallax.ops.backend("paged_attention", device)`` says which one runs.

Long contexts are split across programs (split-K, vLLM's "v2"): each sequence's tokens are cut
into partitions of ``partition_size`` tokens, one program per (sequence, KV head, partition)
computes a partial softmax and output, and a reduce kernel combines them. ``partition_size=None``
chooses automatically (``choose_partition_size``); ``0`` never splits; ``n > 0`` forces
partitions of ``n`` tokens.

Bounds: block ids that point outside the cache (and context lengths outside ``[0, max_blocks *
block_size]``) are checked on the host for CPU tensors, where that costs no sync, and raise
``ValueError``. On CUDA that check would need a device-to-host sync per call, so by default the
kernels guard instead: they never dereference such a block and write NaN for that sequence. The
CPU kernel guards the same way, so with it ``validate=False`` is safe on CPU tensors too (saving
the check's few small tensor ops per call). ``validate=True`` runs the check for CUDA tensors
too (a few small device ops, then one sync).
The same holds for ``reshape_and_cache``'s slots: on CUDA a slot past the cache is skipped.
"""

from __future__ import annotations

import functools
import math
import os
from types import ModuleType

import torch

Tensor = torch.Tensor

from parallax import _extension

__all__ = [
    "paged_attention",
    "paged_attention_ref",
    "reshape_and_cache",
    "reshape_and_cache_ref",
    "backend",
    "reshape_and_cache_backend",
    "check_block_tables",
    "check_cache_inputs",
    "choose_partition_size",
    "DEFAULT_CUDA_BACKEND",
    "BLOCK_SIZES",
    "HEAD_DIMS",
    "DTYPES",
]

# The default implementation on CUDA tensors: "cuda" or "triton". Set it to the faster one as
# measured by `python -m bench paged_attention` on the GPU.
DEFAULT_CUDA_BACKEND = "cuda"

BLOCK_SIZES = (8, 16, 32)
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("cuda", "cpu", "triton", "reference")

# Split-K: partitions are multiples of MIN_PARTITION tokens, and a launch aims at
# PROGRAMS_PER_SM programs per streaming multiprocessor (several waves, so the last one's tail
# matters little).
MIN_PARTITION = 256
PROGRAMS_PER_SM = 8
# Query heads one CUDA thread block serves (the kernel's largest GQA group tile).
_CUDA_MAX_GROUP = 8


def _has_op(name: str, device_type: str) -> bool:
    try:
        return _extension.has_kernel(name, device_type)
    except RuntimeError:  # an extension built before this op existed
        return False


if _extension.available() and hasattr(torch.ops.parallax, "paged_attention"):

    @torch.library.register_fake("parallax::paged_attention")
    def _paged_attention_fake(q, k_cache, v_cache, block_tables, context_lens, softmax_scale, partition_size):
        return q.new_empty(q.shape)

    @torch.library.register_fake("parallax::reshape_and_cache")
    def _reshape_and_cache_fake(k, v, k_cache, v_cache, slot_mapping) -> None:
        return None


@functools.cache
def _triton_kernels() -> ModuleType | None:
    """The Triton kernels module, or None when triton is not installed. On CPU they run only when
    ``TRITON_INTERPRET=1`` was set before this first import."""
    try:
        from parallax.kernels import paged_attention as kernels
    except ImportError:
        return None
    return kernels


def _triton_runs_on_cpu() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("1", "true", "on", "yes"):
        return False
    kernels = _triton_kernels()
    if kernels is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels._paged_attn_fwd, InterpretedFunction)


def _available(name: str, device_type: str) -> list[str]:
    """Implementations of op ``name`` that can run on ``device_type``, best first."""
    if device_type == "cuda":
        found = [b for b in ("cuda", "triton") if (b == "cuda" and _has_op(name, "cuda"))
                 or (b == "triton" and _triton_kernels() is not None)]
        found.sort(key=lambda b: b != DEFAULT_CUDA_BACKEND)
        return found + ["reference"]
    found = ["cpu"] if device_type == "cpu" and _has_op(name, "cpu") else []
    if device_type == "cpu" and _triton_runs_on_cpu():
        found.append("triton")
    return found + ["reference"]


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation ``paged_attention`` uses by default for tensors on ``device``:
    'cuda', 'cpu', 'triton' or 'reference'."""
    return _available("paged_attention", torch.device(device).type)[0]


def reshape_and_cache_backend(device: torch.device | str = "cpu") -> str:
    """Which implementation ``reshape_and_cache`` uses by default for tensors on ``device``."""
    return _available("reshape_and_cache", torch.device(device).type)[0]


def _why_no_cpu_kernel(name: str) -> str:
    if name != "paged_attention":
        return "the compiled CPU kernel implements paged_attention only"
    if not _extension.available():
        return f"the compiled CPU kernel needs parallax._C, which did not load: {_extension.load_error()}"
    return "the compiled CPU kernel runs on CPU tensors, and parallax._C has none (an older build?)"


def _pick(op: str, name: str, requested: str | None, device: torch.device) -> str:
    available = _available(name, device.type)
    if requested is None:
        return available[0]
    if requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {', '.join(BACKENDS)} or None, got {requested!r}")
    if requested not in available:
        why = {
            "cuda": "the compiled CUDA kernel runs on CUDA tensors when parallax._C was built with CUDA",
            "cpu": _why_no_cpu_kernel(name),
            "triton": "Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 "
                      "(set before the kernels are first imported)",
        }[requested]
        raise ValueError(f"{op}: backend={requested!r} cannot run on {device.type} tensors here ({why}); "
                         f"available: {', '.join(available)}")
    return requested


# ---------------------------------------------------------------------------------------------
# checks


def check_cache_inputs(op: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                       context_lens: Tensor) -> None:
    """The checks ``paged_attention`` and ``paged_attention_varlen`` share: ranks, devices and
    dtypes of q (rows, H, D), the caches, block_tables and context_lens; the cache layout, head
    dim, block size and GQA grouping. Raises ``TypeError``/``ValueError`` naming the argument."""
    for name, t, rank in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4),
                          ("block_tables", block_tables, 2), ("context_lens", context_lens, 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{op}: {name} must have {rank} dims, got shape {tuple(t.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("context_lens", context_lens)):
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if q.dtype not in DTYPES:
        raise ValueError(f"{op}: q has dtype {q.dtype}; supported: float16, bfloat16, float32")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"{op}: {name} must be int32, got {t.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}")
    h, d = q.shape[1], q.shape[2]
    _, block_size, h_kv, d_cache = k_cache.shape
    if d_cache != d:
        raise ValueError(f"{op}: q has head dim {d} but k_cache has {d_cache}")
    if d not in HEAD_DIMS:
        raise ValueError(f"{op}: head dim {d} (q.shape[2]) is not supported; supported: {HEAD_DIMS}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"{op}: block size {block_size} (k_cache.shape[1]) is not supported; "
                         f"supported: {BLOCK_SIZES}")
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"{op}: q has {h} heads, which is not a multiple of k_cache's {h_kv} KV heads "
                         "(q.shape[1] % k_cache.shape[2] must be 0)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (num_blocks, block_size, H_kv, D)")


def _check_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor) -> None:
    op = "paged_attention"
    check_cache_inputs(op, q, k_cache, v_cache, block_tables, context_lens)
    n = q.shape[0]
    if block_tables.shape[0] != n:
        raise ValueError(f"{op}: block_tables has {block_tables.shape[0]} rows but q has {n} sequences")
    if context_lens.shape[0] != n:
        raise ValueError(f"{op}: context_lens has {context_lens.shape[0]} entries but q has {n} sequences")


def check_block_tables(block_tables: torch.Tensor, context_lens: torch.Tensor, num_blocks: int,
                       block_size: int, op: str = "paged_attention", first_blocks: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` (its message starting with ``op``) when a context length is outside
    ``[0, max_blocks * block_size]`` or a block id that a sequence uses (its first
    ceil(context / block_size) entries, from entry ``first_blocks[i]`` on when given) is outside
    ``[0, num_blocks)``. Unused entries (padding) may hold anything. Syncs on CUDA tensors."""
    max_blocks = block_tables.shape[1]
    ctx = context_lens.long()
    too_long = (ctx < 0) | (ctx > max_blocks * block_size)
    entries = torch.arange(max_blocks, device=ctx.device)
    used = entries * block_size < ctx[:, None]
    if first_blocks is not None:
        used &= entries >= first_blocks[:, None]
    bad = used & ((block_tables < 0) | (block_tables >= num_blocks))
    flags = torch.stack([too_long.any(), bad.any()]).tolist()  # one sync on CUDA
    if flags[0]:
        i = int(too_long.nonzero()[0, 0])
        raise ValueError(f"{op}: context_lens[{i}] = {int(ctx[i])} is outside [0, {max_blocks * block_size}] "
                         f"(block_tables has {max_blocks} blocks of {block_size} tokens per sequence)")
    if flags[1]:
        i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"{op}: block_tables[{i}, {j}] = {int(block_tables[i, j])} points outside the cache "
                         f"(k_cache has {num_blocks} blocks)")


# ---------------------------------------------------------------------------------------------
# paged attention


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_partition_size(num_seqs: int, num_kv_heads: int, max_context: int,
                          device: torch.device | str = "cpu") -> int:
    """Tokens per split-K partition for a launch, or 0 for no split.

    No split when no sequence can exceed ``MIN_PARTITION`` tokens. Otherwise the launch aims at
    ``PROGRAMS_PER_SM`` programs per SM of the device (1 "SM" on CPU): a batch too small to fill
    the GPU, or long contexts, get partitions of a multiple of ``MIN_PARTITION`` tokens.
    ``max_context`` is the bound the launcher knows without a sync: ``block_tables.shape[1] *
    block_size``.
    """
    if max_context <= MIN_PARTITION:
        return 0
    device = torch.device(device)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1
    programs = max(1, num_seqs * num_kv_heads)
    parts = min(math.ceil(PROGRAMS_PER_SM * sms / programs), math.ceil(max_context / MIN_PARTITION))
    if parts <= 1:
        return 0
    return MIN_PARTITION * math.ceil(max_context / (parts * MIN_PARTITION))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
    backend: str | None = None,
    *,
    partition_size: int | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Single-token decode attention over a paged KV cache; returns (N, H, D) in q's dtype.

    q: (N, H, D), one query token per sequence. k_cache, v_cache: (num_blocks, block_size, H_kv,
    D), contiguous, block_size in ``BLOCK_SIZES``, D in ``HEAD_DIMS``, H a multiple of H_kv (GQA:
    query head h reads KV head h // (H // H_kv)). block_tables: int32 (N, max_blocks), token t of
    sequence n in block ``block_tables[n, t // block_size]`` at offset ``t % block_size``.
    context_lens: int32 (N,), the number of cached tokens each sequence attends to (0 gives a
    zero output). fp16, bf16 or fp32, accumulated in fp32. ``softmax_scale`` defaults to
    1/sqrt(D).

    backend: 'cuda', 'cpu', 'triton', 'reference' or None (the default for the device, see
    ``backend``).
    partition_size: None (automatic), 0 (no split-K) or the tokens per split-K partition (the
    'cpu' kernel never splits).
    validate: check block ids and context lengths on the host (None: on CPU tensors only; without
    it the 'cuda' and 'cpu' kernels write NaN for a sequence whose block table points outside the
    cache).
    """
    _check_attention(q, k_cache, v_cache, block_tables, context_lens)
    chosen = _pick("paged_attention", "paged_attention", backend, q.device)
    num_blocks, block_size, h_kv, d = k_cache.shape
    if validate is None:
        validate = q.device.type == "cpu"
    if validate:
        check_block_tables(block_tables, context_lens, num_blocks, block_size)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    if chosen == "reference":
        return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)

    max_context = block_tables.shape[1] * block_size
    if partition_size is None:
        partition_size = choose_partition_size(q.shape[0], h_kv, max_context, q.device)
    elif not isinstance(partition_size, int) or partition_size < 0:
        raise ValueError(f"paged_attention: partition_size must be None, 0 or a positive int, got {partition_size!r}")
    if partition_size >= max_context:
        partition_size = 0  # one partition holds every context: the same as not splitting
    if q.stride(2) != 1:
        q = q.contiguous()
    if q.shape[0] == 0:
        return q.new_empty(q.shape)
    if chosen in ("cuda", "cpu"):
        return torch.ops.parallax.paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                  partition_size)
    return _paged_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, partition_size)


def _paged_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
                            scale: float, partition_size: int) -> Tensor:
    """The Triton decode kernel (plus the split-K reduce when ``partition_size`` > 0): q (N, H, D)
    over caches (num_blocks, block_size, H_kv, D) -> (N, H, D) in q's dtype."""
    kernels = _triton_kernels()
    n, h, d = q.shape
    num_blocks, block_size, h_kv, _ = k_cache.shape
    group = h // h_kv
    max_context = max(block_tables.shape[1] * block_size, 1)
    split = partition_size > 0
    if not split:
        partition_size = max_context
    parts = math.ceil(max_context / partition_size)
    out = torch.empty((n, h, d), dtype=q.dtype, device=q.device)
    if split:
        part_acc = torch.empty((n, h, parts, d), dtype=torch.float32, device=q.device)
        part_m = torch.empty((n, h, parts), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    block_n = 32 if (q.device.type == "cpu" or d > 128) else 64
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    kernels._paged_attn_fwd[(n, h_kv, parts)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_acc, part_m, part_l,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        h, num_blocks, block_tables.shape[1], partition_size, parts,
        GROUP=group, GROUP_PAD=max(16, _next_pow2(group)), HEAD_DIM=d, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, SPLIT=split, UPCAST=q.device.type == "cpu",
        num_warps=4,
    )
    if split:
        kernels._paged_attn_reduce[(n, h)](
            out, part_acc, part_m, part_l, context_lens,
            out.stride(0), out.stride(1), h, partition_size, parts,
            HEAD_DIM=d, PARTS=16, num_warps=4,
        )
    return out


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@torch.no_grad()
def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain PyTorch: gather each sequence's K/V token by token through its block table, then
    softmax(q k^T * scale) v. Computed in float32 (float64 inputs in float64) when ``upcast``,
    else in the input dtype (PyTorch's own same-precision error, for tolerances); returned in q's
    dtype. A context length of 0 gives zeros."""
    n, h, d = q.shape
    block_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = h // h_kv
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    compute = (torch.float64 if q.dtype == torch.float64 else torch.float32) if upcast else q.dtype
    out = torch.zeros((n, h, d), dtype=compute, device=q.device)
    lens = context_lens.tolist()
    for i in range(n):
        if lens[i] == 0:
            continue
        tok = torch.arange(lens[i], device=q.device)
        blocks = block_tables[i, tok // block_size].long()
        k = k_cache[blocks, tok % block_size].to(compute).repeat_interleave(group, dim=1)  # (L, H, D)
        v = v_cache[blocks, tok % block_size].to(compute).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[i].to(compute), k) * scale  # (H, L)
        out[i] = torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), v)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# KV-cache write


def _check_cache_write(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    op = "reshape_and_cache"
    for name, t, rank in (("k", k, 3), ("v", v, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4),
                          ("slot_mapping", slot_mapping, 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{op}: {name} must have {rank} dims, got shape {tuple(t.shape)}")
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        if t.device != k.device:
            raise ValueError(f"{op}: {name} is on {t.device} but k is on {k.device}")
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != k.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but k has {k.dtype}; they must match")
    if k.dtype not in DTYPES:
        raise ValueError(f"{op}: k has dtype {k.dtype}; supported: float16, bfloat16, float32")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}")
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"{op}: k has (H_kv, D) = {tuple(k.shape[1:])} but k_cache has {tuple(k_cache.shape[2:])}")
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: slot_mapping has {slot_mapping.shape[0]} entries but k has {k.shape[0]} tokens")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (num_blocks, block_size, H_kv, D)")


def reshape_and_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: str | None = None,
    *,
    validate: bool | None = None,
) -> None:
    """Write new tokens' keys and values into the paged cache, in place.

    k, v: (T, H_kv, D) (any token and head strides). k_cache, v_cache: (num_blocks, block_size,
    H_kv, D), contiguous, k's dtype. slot_mapping: int32 or int64 (T,); token i goes to block
    ``slot // block_size`` at offset ``slot % block_size``; a negative slot skips the token
    (padding, as in vLLM). Two tokens with one slot leave either one there.
    validate: check that no slot is past the cache (None: on CPU tensors only; on CUDA such a slot
    is skipped).
    """
    _check_cache_write(k, v, k_cache, v_cache, slot_mapping)
    chosen = _pick("reshape_and_cache", "reshape_and_cache", backend, k.device)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if validate is None:
        validate = k.device.type == "cpu"
    if validate and slot_mapping.numel():
        top = int(slot_mapping.max())
        if top >= num_slots:
            i = int((slot_mapping >= num_slots).nonzero()[0, 0])
            raise ValueError(f"reshape_and_cache: slot_mapping[{i}] = {int(slot_mapping[i])} is past the cache "
                             f"({k_cache.shape[0]} blocks of {k_cache.shape[1]} = {num_slots} slots)")
    if chosen == "reference":
        reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping)
        return
    if k.shape[0] == 0:
        return
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    if chosen == "cuda":
        torch.ops.parallax.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
        return
    h_kv, d = k.shape[1], k.shape[2]
    _triton_kernels()._reshape_and_cache[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_slots,
        NUM_KV_HEADS=h_kv, HEADS_PAD=_next_pow2(h_kv), HEAD_DIM=d, DIM_PAD=_next_pow2(d),
        BLOCK_SIZE=k_cache.shape[1], num_warps=4,
    )


@torch.no_grad()
def reshape_and_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Plain PyTorch ``reshape_and_cache``: an indexed copy of the tokens whose slot is >= 0."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = k[keep]
    v_cache[slots // block_size, slots % block_size] = v[keep]
