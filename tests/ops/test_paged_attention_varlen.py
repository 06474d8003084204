"""paged_attention_varlen (Triton kernel and plain-PyTorch reference) against naive float64 attention.

The exact answer is built from the unpaged keys and values: per sequence, explicit softmax of
q k^T with the bottom-right causal (and sliding-window) mask, in float64. Both implementations are
held to FlashAttention's rule: their error against it at most twice PyTorch's own error (the same
naive math in the input dtype) plus a small atol. Caches are NaN everywhere no sequence wrote, so
an implementation that reads an unused slot, a padded block-table entry or a key outside a
query's window fails; each sequence's blocks are shuffled over a pool larger than needed.

On CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set here when there is no
GPU and it is not set already) with small shapes; the interpreter's tl.dot is wrong on bf16
operands, so bf16 is tested on a GPU only.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from parallax import ops  # noqa: E402
from parallax.ops import paged_attention, paged_attention_varlen, reshape_and_cache  # noqa: E402
from tests.helpers import CUDA, triton_interpreter_problem  # noqa: E402

pav = importlib.import_module("parallax.ops.paged_attention_varlen")  # the module (the package exports the function)

DEVICE = "cuda" if CUDA else "cpu"
# atol added to 2x PyTorch's own error (which can be 0: a one-token context copies v exactly)
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _kernel_skip_reason() -> str | None:
    if "triton" not in pav._available(DEVICE):
        return "Triton cannot run here (on CPU it needs TRITON_INTERPRET=1 before the kernels are imported)"
    return None if CUDA else triton_interpreter_problem()


KERNEL_SKIP = _kernel_skip_reason()
BACKENDS = [pytest.param("triton", marks=[pytest.mark.skip(reason=KERNEL_SKIP)] if KERNEL_SKIP else []), "reference"]
RUNNABLE = ["reference"] if KERNEL_SKIP else ["triton", "reference"]


# --------------------------------------------------------------------------------------------
# helpers


@dataclass
class Case:
    """Inputs of one call plus the unpaged keys/values of each sequence (for the naive reference)."""

    q: torch.Tensor  # (T, H, D)
    k_cache: torch.Tensor  # (num_blocks, block_size, H_kv, D), NaN where no sequence wrote
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # (S, max_blocks) int32, unused entries -1
    cu_seqlens_q: torch.Tensor  # (S + 1,) int32
    context_lens: torch.Tensor  # (S,) int32
    max_seqlen_q: int
    keys: list[torch.Tensor]  # per sequence (context, H_kv, D)
    values: list[torch.Tensor]

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.cu_seqlens_q, self.context_lens,
                self.max_seqlen_q)


def _case(seqs, h, h_kv, d, block_size, dtype, *, seed=0, spare=3, strided_tables=False, window=None,
          device=DEVICE) -> Case:
    """seqs: (new tokens, context length) per sequence, context counting the new tokens.
    ``strided_tables``: block_tables is a non-contiguous view (every other column of a wider tensor).
    ``window``: the blocks wholly before a sequence's first visible key are "freed", as an engine
    may do: NaN in the cache, and a block id far outside it in the table."""
    gen = torch.Generator().manual_seed(seed)
    need = [math.ceil(ctx / block_size) for _, ctx in seqs]
    max_blocks = max(need + [1]) + 1  # one padding column at least
    pool = torch.randperm(sum(need) + spare, generator=gen).tolist()
    k_cache = torch.full((sum(need) + spare, block_size, h_kv, d), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    wide = torch.full((len(seqs), 2 * max_blocks), -1, dtype=torch.int32)
    tables = wide[:, ::2] if strided_tables else wide[:, :max_blocks].clone()
    keys, values = [], []
    for i, (_, ctx) in enumerate(seqs):
        blocks = torch.tensor([pool.pop() for _ in range(need[i])], dtype=torch.int32)
        tables[i, :need[i]] = blocks
        tok = torch.arange(ctx)
        keys.append(torch.randn(ctx, h_kv, d, generator=gen).to(dtype))
        values.append(torch.randn(ctx, h_kv, d, generator=gen).to(dtype))
        k_cache[blocks.long()[tok // block_size], tok % block_size] = keys[-1].float()
        v_cache[blocks.long()[tok // block_size], tok % block_size] = values[-1].float()
        if window is not None:
            freed = max(0, ctx - seqs[i][0] - window + 1) // block_size
            k_cache[blocks[:freed].long()] = v_cache[blocks[:freed].long()] = float("nan")
            tables[i, :freed] = 10**6
    news = [n for n, _ in seqs]
    cu = torch.tensor([0] + [sum(news[:i + 1]) for i in range(len(news))], dtype=torch.int32)
    q = torch.randn(sum(news), h, d, generator=gen).to(dtype)
    return Case(q.to(device), k_cache.to(device, dtype), v_cache.to(device, dtype), tables.to(device),
                cu.to(device), torch.tensor([c for _, c in seqs], dtype=torch.int32, device=device),
                max(news + [0]), keys, values)


def _visible(n, ctx, window):
    """(n, ctx) bool: query j of a sequence (position ctx - n + j) sees key k."""
    query_pos = torch.arange(ctx - n, ctx)[:, None]
    key_pos = torch.arange(ctx)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= query_pos - key_pos < window
    return visible


def _naive(case: Case, dtype, scale=None, window=None) -> torch.Tensor:
    """Explicit softmax attention per sequence over its unpaged keys/values, computed in ``dtype``
    (float64: the exact answer; the input dtype: PyTorch's own error)."""
    q = case.q.cpu()
    h, d = q.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(q.shape, dtype=dtype)
    cu = case.cu_seqlens_q.tolist()
    for i, (k, v) in enumerate(zip(case.keys, case.values)):
        n = cu[i + 1] - cu[i]
        if n == 0:
            continue
        group = h // k.shape[1]
        qs = q[cu[i]:cu[i + 1]].to(dtype).transpose(0, 1)  # (H, n, D)
        ks = k.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)  # (H, ctx, D)
        vs = v.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(~_visible(n, k.shape[0], window), float("-inf"))
        out[cu[i]:cu[i + 1]] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1)
    return out


def _check_rule(out, case: Case, scale=None, window=None, what=""):
    """FlashAttention's rule: max |out - exact| <= 2 x max |PyTorch same-dtype - exact| + atol."""
    dtype = case.q.dtype
    assert out.dtype == dtype and out.shape == case.q.shape, f"{what}: {out.dtype} {tuple(out.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output (an unused or out-of-window slot was read?)"
    if out.numel() == 0:
        return
    exact = _naive(case, torch.float64, scale, window)
    err = (out.cpu().double() - exact).abs().max().item()
    ref_err = (_naive(case, dtype, scale, window).double() - exact).abs().max().item()
    bound = 2 * ref_err + ATOL[dtype]
    assert err <= bound, (f"{what}: max error {err:.3g} exceeds 2 x PyTorch's {dtype} error {ref_err:.3g} "
                          f"+ {ATOL[dtype]}")


# A mixed batch: decodes (n = 1, one of them the whole context), whole prompts (n = ctx) and
# chunked prefills after a cached prefix (n < ctx), odd lengths, one sequence without new tokens.
MIXED = [(1, 1), (1, 23), (7, 7), (5, 40), (0, 9), (20, 97), (1, 16)]
# (H, H_kv, D, block_size): GQA groups 1, 2 and 4; head dims 16 to 64; block sizes 8 and 16
SHAPES = [(2, 2, 16, 8), (4, 2, 32, 16), (8, 2, 64, 8)]


# --------------------------------------------------------------------------------------------
# against the float64 reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-Hkv{}-D{}-bs{}".format(*s))
def test_mixed_batch_matches_float64(backend, dtype, shape):
    case = _case(MIXED, *shape, dtype, seed=sum(shape))
    _check_rule(paged_attention_varlen(*case.args(), backend=backend), case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [1, 5, 16, 40, 1000])
def test_sliding_window(backend, window):
    """Windows of one key (the query itself), smaller than a key step (whole steps are skipped),
    near the context and larger than every context; blocks before the windows are freed."""
    case = _case([(1, 50), (30, 30), (9, 61), (2, 5)], 4, 2, 16, 8, torch.float32, seed=window, window=window)
    _check_rule(paged_attention_varlen(*case.args(), sliding_window=window, backend=backend), case,
                window=window, what=f"window {window}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_window_and_scale(backend):
    case = _case([(3, 70), (1, 33), (17, 17)], 4, 1, 32, 16, torch.float16, seed=11, window=24)
    out = paged_attention_varlen(*case.args(), softmax_scale=0.3, sliding_window=24, backend=backend)
    _check_rule(out, case, scale=0.3, window=24)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_prompt(backend):
    """A 97-token prompt next to a decode: several query tiles of one sequence."""
    case = _case([(97, 97), (1, 12)], 2, 1, 16, 16, torch.float32, seed=12)
    _check_rule(paged_attention_varlen(*case.args(), backend=backend), case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """q as a slice of a fused qkv tensor (strided tokens and heads) and a non-contiguous block table."""
    case = _case([(4, 20), (1, 9), (6, 6)], 4, 2, 32, 8, torch.float32, seed=13, strided_tables=True)
    assert not case.block_tables.is_contiguous()
    qkv = torch.cat([case.q, torch.randn_like(case.q)], dim=1)
    out = paged_attention_varlen(qkv[:, :4], *case.args()[1:], backend=backend)
    _check_rule(out, case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decodes_equal_paged_attention(backend):
    """A batch of decodes only is what paged_attention (the decode op) computes."""
    case = _case([(1, 1), (1, 30), (1, 17)], 4, 2, 32, 8, torch.float32, seed=14)
    out = paged_attention_varlen(*case.args(), backend=backend)
    expected = paged_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                               backend="reference")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches(backend):
    case = _case([(0, 5), (0, 0)], 2, 2, 16, 8, torch.float32, seed=15)
    assert paged_attention_varlen(*case.args(), backend=backend).shape == (0, 2, 16)
    none = _case([], 2, 2, 16, 8, torch.float32)
    assert paged_attention_varlen(*none.args(), backend=backend).shape == (0, 2, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_after_reshape_and_cache(backend):
    """The engine's use: each step writes its new tokens with reshape_and_cache, then attends.
    A prompt prefilled in chunks of 11 tokens, a second sequence decoding beside it; the result
    equals causal SDPA over the whole contiguous sequence."""
    gen = torch.Generator().manual_seed(16)
    h, h_kv, d, bs, length = 4, 2, 16, 8, 30
    tables = torch.randperm(10, generator=gen)[:8].view(2, 4).int().to(DEVICE)
    k_cache = torch.zeros(10, bs, h_kv, d, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    q, k, v = (torch.randn(2, length, heads, d, generator=gen).to(DEVICE) for heads in (h, h_kv, h_kv))
    done = [0, 0]
    outs = [[], []]
    while done[0] < length:
        news = [min(11, length - done[0]), 1 if done[1] < length else 0]
        rows = [torch.arange(done[i], done[i] + news[i], device=DEVICE) for i in range(2)]
        slots = torch.cat([tables[i, r // bs].long() * bs + r % bs for i, r in enumerate(rows)])
        reshape_and_cache(torch.cat([k[i, r] for i, r in enumerate(rows)]),
                          torch.cat([v[i, r] for i, r in enumerate(rows)]), k_cache, v_cache, slots)
        cu = torch.tensor([0, news[0], news[0] + news[1]], dtype=torch.int32, device=DEVICE)
        lens = torch.tensor([done[0] + news[0], done[1] + news[1]], dtype=torch.int32, device=DEVICE)
        out = paged_attention_varlen(torch.cat([q[i, r] for i, r in enumerate(rows)]), k_cache, v_cache, tables,
                                     cu, lens, max(news), backend=backend)
        outs[0].append(out[:news[0]])
        outs[1].append(out[news[0]:])
        done = [done[i] + news[i] for i in range(2)]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(torch.cat(outs[0]), expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(outs[1]), expected[1, :done[1]], atol=1e-5, rtol=1e-5)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    contexts=st.lists(st.integers(1, 45), min_size=1, max_size=4),
    data=st.data(),
    h_kv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3, 4]),
    d=st.sampled_from([16, 32]),
    bs=st.sampled_from([8, 16]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    window=st.one_of(st.none(), st.integers(1, 50)),
)
def test_random_batches(contexts, data, h_kv, group, d, bs, dtype, window):
    seqs = [(data.draw(st.integers(0, ctx), label="new tokens"), ctx) for ctx in contexts]
    case = _case(seqs, h_kv * group, h_kv, d, bs, dtype, seed=sum(contexts), window=window)
    for backend in RUNNABLE:
        out = paged_attention_varlen(*case.args(), sliding_window=window, backend=backend)
        _check_rule(out, case, window=window, what=backend)


def test_sliding_window_is_transformers_convention():
    """The mask these tests check against is the one transformers builds for Mistral/Qwen2."""
    masking = pytest.importorskip("transformers.masking_utils")
    n, ctx = 6, 20
    q_idx, kv_idx = torch.arange(ctx - n, ctx)[:, None], torch.arange(ctx)[None, :]  # absolute positions
    for window in (1, 3, 8, 25):
        hf = masking.sliding_window_causal_mask_function(window)(0, 0, q_idx, kv_idx)
        assert torch.equal(_visible(n, ctx, window), hf), window
    assert torch.equal(_visible(n, ctx, None), masking.causal_mask_function(0, 0, q_idx, kv_idx))


# --------------------------------------------------------------------------------------------
# GPU only: bf16 (the interpreter's bf16 tl.dot is wrong), larger shapes, the kernel's guards


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (Triton's interpreter computes bf16 tl.dot wrongly)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(32, 8, 128, 16), (8, 8, 64, 32), (16, 2, 256, 16), (8, 1, 128, 8)],
                         ids=lambda s: "H{}-Hkv{}-D{}-bs{}".format(*s))
@pytest.mark.parametrize("window", [None, 100])
def test_gpu_dtypes_and_shapes(dtype, shape, window):
    seqs = [(1, 700), (300, 300), (129, 1000), (1, 1), (64, 64), (17, 250)] + [(1, 33)] * 8
    case = _case(seqs, *shape, dtype, seed=17, window=window)
    out = paged_attention_varlen(*case.args(), sliding_window=window)
    _check_rule(out, case, window=window)
    decodes = _case([(1, 700), (1, 1), (1, 250)] + [(1, 33)] * 8, *shape, dtype, seed=18, window=window)
    _check_rule(paged_attention_varlen(*decodes.args(), sliding_window=window), decodes, window=window)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: on CPU bad inputs raise (test_bad_block_id_raises)")
def test_cuda_guards_write_nan():
    """Without validation the kernel never reads outside the cache: the affected tokens become NaN."""
    case = _case([(3, 20), (4, 40), (2, 9)], 4, 2, 64, 16, torch.float16, seed=19)
    tables = case.block_tables.clone()
    tables[1, 0] = case.k_cache.shape[0] + 1000
    out = paged_attention_varlen(case.q, case.k_cache, case.v_cache, tables, *case.args()[4:])
    assert out[3:7].isnan().all() and torch.isfinite(out[:3]).all() and torch.isfinite(out[7:]).all()
    lens = case.context_lens.clone()
    lens[2] = 1  # fewer than its 2 new tokens
    out = paged_attention_varlen(case.q, case.k_cache, case.v_cache, case.block_tables, case.cu_seqlens_q, lens,
                                 case.max_seqlen_q)
    assert out[7:].isnan().all() and torch.isfinite(out[:7]).all()
    with pytest.raises(ValueError, match=r"block_tables\[1, 0\]"):
        paged_attention_varlen(case.q, case.k_cache, case.v_cache, tables, *case.args()[4:], validate=True)


# --------------------------------------------------------------------------------------------
# bad inputs, dispatch


def _good() -> Case:
    """On CPU, where the data checks (offsets, lengths, block ids) run by default."""
    return _case([(2, 5), (1, 12)], 4, 2, 16, 8, torch.float32, seed=20, device="cpu")


def test_bad_inputs_name_the_argument():
    c = _good()
    q, k, v, tables, cu, lens, max_q = c.args()
    cases = [
        ((q.half(), k, v, tables, cu, lens, max_q), "k_cache has dtype"),
        ((q[0], k, v, tables, cu, lens, max_q), "q must have 3 dims"),
        ((q[:, :3], k, v, tables, cu, lens, max_q), "not a multiple of k_cache's 2 KV heads"),
        ((q[..., :8], k[..., :8], v[..., :8], tables, cu, lens, max_q), "head dim 8 .* not supported"),
        ((q, k.view(-1, 4, 2, 16), v.view(-1, 4, 2, 16), tables, cu, lens, max_q), "block size 4 .* not supported"),
        ((q, k, v, tables.long(), cu, lens, max_q), "block_tables must be int32"),
        ((q, k, v, tables, cu.long(), lens, max_q), "cu_seqlens_q must be a 1-D int32 tensor"),
        ((q, k, v, tables, cu[None], lens, max_q), "cu_seqlens_q must be a 1-D int32 tensor"),
        ((q, k, v, tables, cu.to("meta"), lens, max_q), "cu_seqlens_q is on meta"),
        ((q, k, v, tables, cu[:2], lens, max_q), "cu_seqlens_q has 2 entries but block_tables has 2 rows"),
        ((q, k, v, tables, cu, lens[:1], max_q), "context_lens has 1 entries but block_tables has 2 rows"),
        ((q, k, v, tables, cu, lens.long(), max_q), "context_lens must be int32"),
        ((q, k, v, tables, cu, lens, -1), "max_seqlen_q must be a non-negative int"),
        ((q, k, v, tables, cu, lens, 2.0), "max_seqlen_q must be a non-negative int"),
        ((q, k, v, tables, cu, lens, 1), r"sequence 0 has 2 new tokens .* more than max_seqlen_q = 1"),
        ((q[:2], k, v, tables, cu, lens, max_q), r"cu_seqlens_q must start at 0, never decrease and end at the 2 "),
        ((q, k, v, tables, torch.tensor([0, 3, 2], dtype=torch.int32), lens, max_q), "never decrease"),
        ((q, k, v, tables, cu, torch.tensor([1, 12], dtype=torch.int32), max_q),
         r"context_lens\[0\] = 1 is less than the sequence's 2 new tokens"),
        ((q, k, v, tables, cu, torch.tensor([5, 25], dtype=torch.int32), max_q),
         r"paged_attention_varlen: context_lens\[1\] = 25 is outside \[0, 24\]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            paged_attention_varlen(*args)
    for window in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="sliding_window must be None .* or an int >= 1"):
            paged_attention_varlen(*c.args(), sliding_window=window)
    with pytest.raises(ValueError, match="softmax_scale must be a finite number"):
        paged_attention_varlen(*c.args(), softmax_scale=float("inf"))
    with pytest.raises(TypeError, match="cu_seqlens_q must be a tensor"):
        paged_attention_varlen(q, k, v, tables, [0, 2, 3], lens, max_q)
    with pytest.raises(ValueError, match="backend must be one of triton, reference"):
        paged_attention_varlen(*c.args(), backend="cuda")


@pytest.mark.parametrize("value", [-1, 10**6])
def test_bad_block_id_raises(value):
    c = _good()
    tables = c.block_tables.clone()
    tables[1, 1] = value
    with pytest.raises(ValueError, match=rf"paged_attention_varlen: block_tables\[1, 1\] = {value} points outside"):
        paged_attention_varlen(c.q, c.k_cache, c.v_cache, tables, *c.args()[4:])
    tables[0, 1:] = value  # past sequence 0's one block: padding, never read
    tables[1, 1] = c.block_tables[1, 1]
    _check_rule(paged_attention_varlen(c.q, c.k_cache, c.v_cache, tables, *c.args()[4:]), c)


def test_backend_reporting():
    from parallax.ops import _triton

    expected = "triton" if _triton.interpreting() else "reference"
    assert ops.backend("paged_attention_varlen", "cpu") == pav.backend("cpu") == expected
    if CUDA:
        assert ops.backend("paged_attention_varlen", "cuda") == "triton"
    if "triton" not in pav._available("cpu"):
        with pytest.raises(ValueError, match="backend='triton' cannot run on cpu"):
            paged_attention_varlen(*_good().args(), backend="triton")


def test_output_needs_no_grad():
    c = _case([(2, 5), (1, 12)], 4, 2, 16, 8, torch.float32, seed=21)
    q = c.q.clone().requires_grad_()
    for backend in RUNNABLE:
        out = paged_attention_varlen(q, *c.args()[1:], backend=backend)
        assert not out.requires_grad, backend
