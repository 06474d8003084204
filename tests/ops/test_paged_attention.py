"""PagedAttention decode and the KV-cache write, both kernels (Triton, CUDA C++) against references.

Attention is checked by FlashAttention's rule: the kernel's error against a float64 reference
(``paged_attention_ref`` on float64 copies, which gathers K/V token by token through the block
table) may be at most twice PyTorch's own error at the same precision (the reference computed in
the input dtype) plus a small atol. Block tables are random, shuffled and non-contiguous over a
pool larger than needed; every cache slot no sequence uses holds NaN, and so do unused block
table entries' targets, so a kernel that reads one fails.

On CPU the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here when there
is no GPU and it is not set already) with small shapes; the CUDA C++ kernel needs a GPU and is
skipped here with that reason. On a GPU every test runs with both kernels.
"""

from __future__ import annotations

import importlib
import math
import os

import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from parallax import _extension, ops  # noqa: E402
from parallax.ops import paged_attention, paged_attention_ref, reshape_and_cache, reshape_and_cache_ref  # noqa: E402
from tests.helpers import CUDA, triton_interpreter_problem  # noqa: E402

pa = importlib.import_module("parallax.ops.paged_attention")  # the module (the package exports the function)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# atol added to 2x PyTorch's own error (which can be 0: a one-token context copies v exactly)
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _skip_reason(device: str, backend: str) -> str | None:
    if device == "cuda" and not CUDA:
        return "no GPU"
    if backend == "cuda":
        if device == "cpu":
            return "the CUDA C++ kernel runs on CUDA tensors only (tested on the GPU)"
        if not _extension.has_kernel("paged_attention", "cuda"):
            return f"parallax._C has no CUDA paged_attention kernel ({_extension.build_info()})"
    if backend == "triton" and "triton" not in pa._available("paged_attention", device):
        return "Triton cannot run here (on CPU it needs TRITON_INTERPRET=1 before the kernels are imported)"
    if backend == "triton" and device == "cpu":
        return triton_interpreter_problem()
    return None


def _kernel_params():
    out = []
    for device in ("cpu", "cuda"):
        for backend in ("triton", "cuda"):
            reason = _skip_reason(device, backend)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            out.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return out


KERNELS = _kernel_params()
RUNNABLE = [p.values for p in KERNELS if not p.marks]


# --------------------------------------------------------------------------------------------
# helpers


def _case(n, h, h_kv, d, block_size, dtype, max_context, *, device="cpu", seed=0, contexts=None, spare=5):
    """Random q, NaN-poisoned caches with each sequence's tokens in shuffled blocks of a larger
    pool, int32 block tables (unused entries -1) and context lengths in [1, max_context] with the
    first ones exact block multiples."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(1, math.ceil(max_context / block_size))
    if contexts is None:
        contexts = torch.randint(1, max_context + 1, (n,), generator=gen).tolist()
        for i, c in enumerate([max_context, block_size, 1][: n // 2]):
            contexts[i] = min(c, max_context)
    need = [math.ceil(c / block_size) for c in contexts]
    num_blocks = sum(need) + spare
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((n, max_blocks), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, h_kv, d), float("nan"))
    v_cache = torch.full((num_blocks, block_size, h_kv, d), float("nan"))
    for i, c in enumerate(contexts):
        blocks = [pool.pop() for _ in range(need[i])]
        tables[i, : need[i]] = torch.tensor(blocks, dtype=torch.int32)
        tok = torch.arange(c)
        idx = torch.tensor(blocks, dtype=torch.long)[tok // block_size]
        k_cache[idx, tok % block_size] = torch.randn(c, h_kv, d, generator=gen)
        v_cache[idx, tok % block_size] = torch.randn(c, h_kv, d, generator=gen)
    q = torch.randn(n, h, d, generator=gen)
    lens = torch.tensor(contexts, dtype=torch.int32)
    return (q.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype), tables.to(device),
            lens.to(device))


def _check_rule(out, q, k_cache, v_cache, tables, lens, scale=None, what=""):
    """FlashAttention's rule: max |out - exact| <= 2 x max |PyTorch same-dtype - exact| + atol."""
    dtype = q.dtype
    assert out.dtype == dtype and out.shape == q.shape, f"{what}: {out.dtype} {tuple(out.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output (a masked or unused slot was read?)"
    exact = paged_attention_ref(q.double(), k_cache.double(), v_cache.double(), tables, lens, scale)
    pytorch = paged_attention_ref(q, k_cache, v_cache, tables, lens, scale, upcast=False)
    err = (out.double() - exact).abs().max().item()
    ref_err = (pytorch.double() - exact).abs().max().item()
    bound = 2 * ref_err + ATOL[dtype]
    assert err <= bound, (f"{what}: max error {err:.3g} exceeds 2 x PyTorch's {dtype} error {ref_err:.3g} "
                          f"+ {ATOL[dtype]}")
    return err


# --------------------------------------------------------------------------------------------
# attention against the reference

# (H, H_kv, D, block_size, max_context): GQA 2:1, 4:1 (and 32/8-like 4:1), MHA, head dims 16 to
# 128, every block size; one context longer than a 256-token tile of the CUDA kernel.
SHAPES = [
    (4, 2, 64, 16, 40),
    (4, 1, 16, 8, 37),
    (8, 2, 32, 32, 70),
    (2, 2, 128, 16, 33),
    (2, 2, 16, 32, 300),
]


@pytest.mark.parametrize("device,backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-Hkv{}-D{}-bs{}-ctx{}".format(*s))
def test_matches_reference(device, backend, dtype, shape):
    h, h_kv, d, bs, max_context = shape
    case = _case(4, h, h_kv, d, bs, dtype, max_context, device=device, seed=sum(shape))
    for partition_size in (0, 16):  # one program per sequence, and forced split-K + reduce
        out = paged_attention(*case, backend=backend, partition_size=partition_size)
        _check_rule(out, *case, what=f"partition_size={partition_size}")


@pytest.mark.parametrize("device,backend", KERNELS)
def test_split_k_on_and_off_agree(device, backend):
    """No split, several forced partition sizes (not multiples of the block size too) and the
    automatic choice give the same result up to rounding."""
    case = _case(3, 4, 2, 32, 8, torch.float32, 90, device=device, seed=3)
    base = paged_attention(*case, backend=backend, partition_size=0)
    _check_rule(base, *case)
    for partition_size in (8, 24, 50, None):
        out = paged_attention(*case, backend=backend, partition_size=partition_size)
        torch.testing.assert_close(out, base, atol=2e-6, rtol=1e-5, msg=f"partition_size={partition_size}")


@pytest.mark.parametrize("device,backend", KERNELS)
def test_gqa_groups_and_scale(device, backend):
    """A group of 12 query heads per KV head (more than one CUDA block's 8) and a custom scale."""
    case = _case(2, 12, 1, 16, 16, torch.float32, 35, device=device, seed=4)
    _check_rule(paged_attention(*case, backend=backend, softmax_scale=0.3), *case, scale=0.3)
    _check_rule(paged_attention(*case, backend=backend, softmax_scale=0.3, partition_size=16), *case, scale=0.3)


@pytest.mark.parametrize("device,backend", KERNELS)
def test_context_edges(device, backend):
    """Lengths 1, one block, exact block multiples, one past a block, and 0 (zero output)."""
    bs = 16
    contexts = [1, bs, 2 * bs, 3 * bs + 1, 0]
    q, k, v, tables, lens = _case(5, 4, 2, 64, bs, torch.float16, 64, device=device, seed=5, contexts=contexts)
    for partition_size in (0, bs):
        out = paged_attention(q, k, v, tables, lens, backend=backend, partition_size=partition_size)
        assert torch.equal(out[4], torch.zeros_like(out[4])), "an empty context must give zeros"
        _check_rule(out[:4], q[:4], k, v, tables[:4], lens[:4], what=f"partition_size={partition_size}")


@pytest.mark.parametrize("device,backend", KERNELS)
def test_strided_query(device, backend):
    """q as a slice of a fused qkv tensor (strided sequence and head dims)."""
    q, k, v, tables, lens = _case(3, 4, 2, 32, 8, torch.float32, 30, device=device, seed=6)
    qkv = torch.cat([q, torch.randn_like(q)], dim=1)
    out = paged_attention(qkv[:, :4], k, v, tables, lens, backend=backend)
    _check_rule(out, q, k, v, tables, lens)


@pytest.mark.skipif(not RUNNABLE, reason="no kernel can run here")
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 3),
    h_kv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3, 4]),
    d=st.sampled_from([16, 32, 64]),
    bs=st.sampled_from(pa.BLOCK_SIZES),
    dtype=st.sampled_from(DTYPES),
    max_context=st.integers(1, 80),
    partition_size=st.sampled_from([None, 0, 8, 32]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(n, h_kv, group, d, bs, dtype, max_context, partition_size, seed):
    for device, backend in RUNNABLE:
        case = _case(n, h_kv * group, h_kv, d, bs, dtype, max_context, device=device, seed=seed)
        out = paged_attention(*case, backend=backend, partition_size=partition_size)
        _check_rule(out, *case, what=f"{device}-{backend}")


@pytest.mark.skipif(not CUDA, reason="needs a GPU: compares the CUDA C++ and Triton kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(32, 8, 128, 16, 700), (8, 8, 64, 8, 300), (16, 2, 256, 32, 1100)],
                         ids=lambda s: "H{}-Hkv{}-D{}-bs{}-ctx{}".format(*s))
def test_cuda_and_triton_agree(dtype, shape):
    if _skip_reason("cuda", "cuda"):
        pytest.skip(_skip_reason("cuda", "cuda"))
    h, h_kv, d, bs, max_context = shape
    case = _case(6, h, h_kv, d, bs, dtype, max_context, device="cuda", seed=7)
    for partition_size in (None, 0, 256):
        a = paged_attention(*case, backend="cuda", partition_size=partition_size)
        b = paged_attention(*case, backend="triton", partition_size=partition_size)
        _check_rule(a, *case, what=f"cuda partition_size={partition_size}")
        _check_rule(b, *case, what=f"triton partition_size={partition_size}")
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.skipif(not CUDA, reason="needs a GPU: on CPU bad block ids raise (see test_bad_block_table)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_bad_block_id_gives_nan(backend):
    """Without validation the kernels never read outside the cache: the sequence becomes NaN."""
    if _skip_reason("cuda", backend):
        pytest.skip(_skip_reason("cuda", backend))
    q, k, v, tables, lens = _case(3, 4, 2, 64, 16, torch.float16, 40, device="cuda", seed=8)
    tables[1, 0] = k.shape[0] + 1000
    for partition_size in (0, 16):
        out = paged_attention(q, k, v, tables, lens, backend=backend, partition_size=partition_size)
        assert out[1].isnan().all()
        assert torch.isfinite(out[[0, 2]]).all()
    with pytest.raises(ValueError, match=r"block_tables\[1, 0\]"):
        paged_attention(q, k, v, tables, lens, backend=backend, validate=True)


# --------------------------------------------------------------------------------------------
# the KV-cache write


def _write_case(t, h_kv, d, bs, dtype, device, slot_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = math.ceil(t / bs) + 2
    slots = torch.randperm(num_blocks * bs, generator=gen)[:t]
    slots[torch.rand(t, generator=gen) < 0.25] = -1  # padding tokens
    kv = torch.randn(t, 2, h_kv, d, generator=gen)  # k and v as strided views of one tensor
    cache = torch.randn(num_blocks, bs, h_kv, d, generator=gen)
    return ([x.to(device, dtype) for x in (kv[:, 0], kv[:, 1], cache, cache.clone() + 1)]
            + [slots.to(device, slot_dtype)])


@pytest.mark.parametrize("device,backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("shape", [(13, 2, 64, 16), (7, 1, 16, 8), (20, 3, 32, 32)],
                         ids=lambda s: "T{}-Hkv{}-D{}-bs{}".format(*s))
def test_reshape_and_cache_matches_reference(device, backend, dtype, slot_dtype, shape):
    k, v, k_cache, v_cache, slots = _write_case(*shape, dtype, device, slot_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reshape_and_cache(k, v, k_cache, v_cache, slots, backend=backend)
    reshape_and_cache_ref(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    # the reference itself: written slots hold the tokens, the others are untouched
    keep = slots >= 0
    bs = k_cache.shape[1]
    s = slots[keep].long()
    assert torch.equal(k_ref[s // bs, s % bs], k[keep]) and torch.equal(v_ref[s // bs, s % bs], v[keep])


@pytest.mark.parametrize("device,backend", KERNELS)
def test_write_then_attend(device, backend):
    """Decode steps: append each new token with reshape_and_cache, attend with paged_attention,
    compare with plain attention over the contiguous keys/values."""
    gen = torch.Generator().manual_seed(9)
    n, h, h_kv, d, bs, steps = 2, 4, 2, 32, 8, 19
    num_blocks = 2 * math.ceil(steps / bs) + 3
    tables = torch.randperm(num_blocks, generator=gen)[: 2 * math.ceil(steps / bs)].view(n, -1).int().to(device)
    k_cache = torch.zeros(num_blocks, bs, h_kv, d, device=device)
    v_cache = torch.zeros_like(k_cache)
    ks = torch.randn(steps, n, h_kv, d, generator=gen).to(device)
    vs = torch.randn(steps, n, h_kv, d, generator=gen).to(device)
    for step in range(steps):
        slots = tables[:, step // bs].long() * bs + step % bs
        reshape_and_cache(ks[step], vs[step], k_cache, v_cache, slots, backend=backend)
    q = torch.randn(n, h, d, generator=gen).to(device)
    lens = torch.full((n,), steps, dtype=torch.int32, device=device)
    out = paged_attention(q, k_cache, v_cache, tables, lens, backend=backend)
    k = ks.permute(1, 2, 0, 3).repeat_interleave(h // h_kv, dim=1)  # (n, h, steps, d)
    v = vs.permute(1, 2, 0, 3).repeat_interleave(h // h_kv, dim=1)
    expected = torch.softmax(torch.einsum("nhd,nhsd->nhs", q, k) / math.sqrt(d), -1)
    expected = torch.einsum("nhs,nhsd->nhd", expected, v)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# bad inputs, dispatch


def _good(device="cpu"):
    return _case(2, 4, 2, 16, 8, torch.float32, 20, device=device, seed=10)


def test_bad_inputs_name_the_argument():
    q, k, v, tables, lens = _good()
    cases = [
        ((q.half(), k, v, tables, lens), "k_cache has dtype"),
        ((q, k, v.half(), tables, lens), "v_cache has dtype"),
        ((q.long(), k.long(), v.long(), tables, lens), "q has dtype"),
        ((q[:, :3], k, v, tables, lens), r"not a multiple of k_cache's 2 KV heads"),
        ((q[0], k, v, tables, lens), "q must have 3 dims"),
        ((q, k[0], v, tables, lens), "k_cache must have 4 dims"),
        ((q, k, v, tables[0], lens), "block_tables must have 2 dims"),
        ((q, k, v, tables, lens[None]), "context_lens must have 1 dims"),
        ((q, k, v, tables.long(), lens), "block_tables must be int32"),
        ((q, k, v, tables, lens.long()), "context_lens must be int32"),
        ((q, k, v[:, :, :1], tables, lens), "v_cache has shape"),
        ((q, k.to("meta"), v, tables, lens), "k_cache is on meta"),
        ((q, k, v, tables.to("meta"), lens), "block_tables is on meta"),
        ((q, k, v, tables[:1], lens), "block_tables has 1 rows"),
        ((q, k, v, tables, lens[:1]), "context_lens has 1 entries"),
        ((q[..., :8], k, v, tables, lens), "q has head dim 8"),
        ((q[..., :8], k[..., :8], v[..., :8], tables, lens), "head dim 8 .* not supported"),
        ((q, k.view(-1, 4, 2, 16), v.view(-1, 4, 2, 16), tables, lens), "block size 4 .* not supported"),
        ((q, k.transpose(1, 2).contiguous().transpose(1, 2), v, tables, lens), "k_cache must be contiguous"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            paged_attention(*args)
    with pytest.raises(ValueError, match="backend must be one of"):
        paged_attention(q, k, v, tables, lens, backend="flash")
    with pytest.raises(ValueError, match="backend='cuda' cannot run on cpu"):
        paged_attention(q, k, v, tables, lens, backend="cuda")
    with pytest.raises(ValueError, match="partition_size"):
        paged_attention(q, k, v, tables, lens, partition_size=-1)


def test_bad_block_table():
    q, k, v, tables, lens = _good()
    for value in (k.shape[0], -1, 10**6):
        bad = tables.clone()
        bad[1, 0] = value
        with pytest.raises(ValueError, match=rf"block_tables\[1, 0\] = {value} points outside the cache"):
            paged_attention(q, k, v, bad, lens)
    with pytest.raises(ValueError, match=r"context_lens\[0\] = 25 is outside \[0, 24\]"):
        paged_attention(q, k, v, tables, torch.tensor([25, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"context_lens\[1\] = -2"):
        paged_attention(q, k, v, tables, torch.tensor([3, -2], dtype=torch.int32))
    # entries past a sequence's context are padding and may hold anything
    padded = tables.clone()
    padded[:, 1:] = 10**6
    lens = torch.minimum(lens, torch.tensor([1, 8], dtype=torch.int32))  # only block 0 in use
    _check_rule(paged_attention(q, k, v, padded, lens), q, k, v, padded, lens)


def test_reshape_and_cache_bad_inputs():
    k, v, k_cache, v_cache, slots = _write_case(5, 2, 16, 8, torch.float32, "cpu", torch.int64)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    cases = [
        ((k.half(), v, k_cache, v_cache, slots), "v has dtype"),
        ((k, v, k_cache.half(), v_cache, slots), "k_cache has dtype"),
        ((k[0], v, k_cache, v_cache, slots), "k must have 3 dims"),
        ((k, v[:4], k_cache, v_cache, slots), "v has shape"),
        ((k, v, k_cache, v_cache[:1], slots), "v_cache has shape"),
        ((k[:, :1], v[:, :1], k_cache, v_cache, slots), r"k has \(H_kv, D\)"),
        ((k, v, k_cache, v_cache, slots.float()), "slot_mapping must be int32 or int64"),
        ((k, v, k_cache, v_cache, slots[:3]), "slot_mapping has 3 entries"),
        ((k, v.to("meta"), k_cache, v_cache, slots), "v is on meta"),
        ((k, v, k_cache, v_cache, torch.tensor([0, 1, -1, 3, num_slots])), rf"slot_mapping\[4\] = {num_slots} is past"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            reshape_and_cache(*args)


def test_backend_reporting():
    assert ops.backend("paged_attention", "cpu") == pa.backend("cpu")
    fallback = "triton" if pa._triton_runs_on_cpu() else "reference"
    assert pa.backend("cpu") == ("cpu" if _extension.has_kernel("paged_attention", "cpu") else fallback)
    assert ops.backend("reshape_and_cache", "cpu") == fallback  # no compiled CPU cache write
    assert pa.DEFAULT_CUDA_BACKEND in ("cuda", "triton")
    if CUDA:
        compiled = _extension.has_kernel("paged_attention", "cuda")
        assert pa.backend("cuda") == (pa.DEFAULT_CUDA_BACKEND if compiled else "triton")


def test_reference_backend_and_partition_choice():
    case = _good()
    torch.testing.assert_close(paged_attention(*case, backend="reference"), paged_attention_ref(*case))
    # a long context on few sequences is split (CPU counts as one SM); short contexts, or enough
    # programs without splitting, are not
    size = pa.choose_partition_size(1, 1, 16384, "cpu")
    assert size > 0 and size % pa.MIN_PARTITION == 0 and math.ceil(16384 / size) <= pa.PROGRAMS_PER_SM
    assert pa.choose_partition_size(64, 8, 200, "cpu") == 0
    assert pa.choose_partition_size(64, 8, 4096, "cpu") == 0


@pytest.mark.skipif(not hasattr(torch.ops.parallax, "paged_attention"),
                    reason="parallax._C was built without the paged_attention schema")
def test_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v, tables, lens = (torch.empty(3, 4, 16), torch.empty(5, 8, 2, 16), torch.empty(5, 8, 2, 16),
                                 torch.empty(3, 2, dtype=torch.int32), torch.empty(3, dtype=torch.int32))
        out = torch.ops.parallax.paged_attention(q, k, v, tables, lens, 0.25, 0)
        assert out.shape == (3, 4, 16) and out.dtype == torch.float32
        torch.ops.parallax.reshape_and_cache(torch.empty(2, 2, 16), torch.empty(2, 2, 16), k, v,
                                             torch.empty(2, dtype=torch.int64))
