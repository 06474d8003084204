"""The compiled CPU PagedAttention decode kernel (backend "cpu"), on every SIMD path this machine has.

Checked by FlashAttention's rule as the other kernels are (``_check_rule`` of
test_paged_attention.py: error against a float64 ``paged_attention_ref`` at most twice PyTorch's
own error at the input precision), on NaN-poisoned caches with shuffled block tables, so a kernel
that reads a slot outside a sequence's context fails. Odd batch sizes (1, 7, 97), contexts of 1,
17 and 1025 tokens, every block size and head dim, GQA groups of 1 to 12, fp32/bf16/fp16.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parallax import _extension, ops
from parallax.ops import paged_attention, reshape_and_cache
from tests.ops.test_paged_attention import DTYPES, _case, _check_rule

pa = importlib.import_module("parallax.ops.paged_attention")

pytestmark = pytest.mark.skipif(not _extension.has_kernel("paged_attention", "cpu"),
                                reason=f"parallax._C has no CPU paged_attention kernel ({_extension.build_info()})")

ORDER = {"scalar": 0, "avx2": 1, "avx512": 2}
ISAS = [isa for isa in ORDER if ORDER[isa] <= ORDER[_extension.build_info().get("detected_cpu_isa", "scalar")]]


class _on_isa:
    """Run the CPU kernels on ``isa`` for the duration of a with-block."""

    def __init__(self, isa: str) -> None:
        self.isa = isa

    def __enter__(self):
        self.previous = _extension.cpu_isa()
        _extension.set_cpu_isa(self.isa)

    def __exit__(self, *exc):
        _extension.set_cpu_isa(self.previous)


# (N, H, H_kv, D, block_size, contexts or max context): every block size and head dim, MHA and
# GQA 2:1, 4:1, 12:1; contexts of 1, 17 (one past a block), block multiples and 1025.
CASES = [
    (1, 4, 4, 64, 16, [1025]),
    (7, 8, 2, 128, 8, [1, 17, 1025, 16, 8, 33, 300]),
    (97, 4, 1, 16, 32, 200),
    (7, 12, 1, 32, 16, [17, 1, 64, 65, 100, 3, 31]),
    (7, 2, 2, 256, 32, [1025, 1, 17, 32, 64, 500, 2]),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "N{}-H{}-Hkv{}-D{}-bs{}".format(*s[:5]))
def test_matches_reference(isa, dtype, shape):
    n, h, h_kv, d, bs, contexts = shape
    if isinstance(contexts, int):  # random lengths up to this, the first few fixed (1, 17, the maximum)
        ctx = torch.randint(1, contexts + 1, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        ctx[:3] = [1, 17, contexts]
        contexts = ctx
    case = _case(n, h, h_kv, d, bs, dtype, max(contexts), seed=n + d, contexts=contexts)
    with _on_isa(isa):
        out = paged_attention(*case, backend="cpu")
    _check_rule(out, *case, what=f"{isa}")


@pytest.mark.parametrize("isa", ISAS)
def test_scale_strided_query_and_empty_context(isa):
    """A custom scale, q as a slice of a fused qkv tensor (strided sequences and heads), and a
    context of 0 (zeros, as the reference and the GPU kernels) next to non-empty ones."""
    q, k, v, tables, lens = _case(5, 4, 2, 64, 16, torch.bfloat16, 50, seed=11, contexts=[3, 0, 50, 17, 0])
    qkv = torch.cat([q, torch.randn_like(q)], dim=1)
    with _on_isa(isa):
        out = paged_attention(qkv[:, :4], k, v, tables, lens, softmax_scale=0.3, backend="cpu")
    assert torch.equal(out[[1, 4]], torch.zeros_like(out[[1, 4]])), "an empty context must give zeros"
    keep = [0, 2, 3]
    _check_rule(out[keep], q[keep], k, v, tables[keep], lens[keep], scale=0.3)


def test_isas_agree_and_threads_do_not_change_the_result():
    """Every SIMD path gives (nearly) the scalar result; 1 and 2 threads give bitwise the same."""
    case = _case(9, 8, 2, 64, 16, torch.float32, 300, seed=12)
    outs = {}
    for isa in ISAS:
        with _on_isa(isa):
            outs[isa] = paged_attention(*case, backend="cpu")
    for isa, out in outs.items():
        torch.testing.assert_close(out, outs["scalar"], atol=2e-6, rtol=1e-5, msg=f"{isa} vs scalar")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_attention(*case, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, paged_attention(*case, backend="cpu"))


def test_partition_size_is_ignored_and_empty_batch():
    case = _case(3, 4, 2, 32, 8, torch.float16, 600, seed=13)
    base = paged_attention(*case, backend="cpu", partition_size=0)
    for partition_size in (None, 8, 256):
        assert torch.equal(paged_attention(*case, backend="cpu", partition_size=partition_size), base)
    q, k, v, tables, lens = case
    out = paged_attention(q[:0], k, v, tables[:0], lens[:0], backend="cpu")
    assert out.shape == (0, 4, 32) and out.dtype == torch.float16


@pytest.mark.parametrize("isa", ISAS)
def test_unvalidated_bad_block_or_length_gives_nan(isa):
    """With validate=False the kernel never reads outside the cache: a sequence whose used block
    id or context length is out of range becomes NaN (as on CUDA); the others are unaffected."""
    q, k, v, tables, lens = _case(4, 4, 2, 64, 16, torch.float32, 40, seed=14, contexts=[40, 20, 33, 5])
    tables[1, 1] = k.shape[0] + 1000  # used: token 16 of 20 is in block 1
    tables[3, 1] = -7                # unused: 5 tokens fit in block 0
    lens[2] = tables.shape[1] * 16 + 1
    with _on_isa(isa):
        out = paged_attention(q, k, v, tables, lens, backend="cpu", validate=False)
    assert out[[1, 2]].isnan().all()
    _check_rule(out[[0, 3]], q[[0, 3]], k, v, tables[[0, 3]], lens[[0, 3]])
    with pytest.raises(ValueError, match=r"block_tables\[1, 1\]"):
        paged_attention(q, k, v, tables, lens.clamp(max=40), backend="cpu")


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 9),
    h_kv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3, 5, 8]),
    d=st.sampled_from(pa.HEAD_DIMS),
    bs=st.sampled_from(pa.BLOCK_SIZES),
    dtype=st.sampled_from(DTYPES),
    max_context=st.integers(1, 130),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(n, h_kv, group, d, bs, dtype, max_context, isa, seed):
    case = _case(n, h_kv * group, h_kv, d, bs, dtype, max_context, seed=seed)
    with _on_isa(isa):
        out = paged_attention(*case, backend="cpu")
    _check_rule(out, *case, what=isa)


def test_dispatch():
    """CPU tensors default to the compiled kernel; the cache write has none (an error says so)."""
    assert pa.backend("cpu") == "cpu" and ops.backend("paged_attention", "cpu") == "cpu"
    assert pa._available("paged_attention", "cpu")[0] == "cpu"
    assert "cpu" not in pa._available("reshape_and_cache", "cpu")
    k = torch.zeros(2, 2, 16)
    cache = torch.zeros(2, 8, 2, 16)
    with pytest.raises(ValueError, match="backend='cpu' cannot run .* implements paged_attention only"):
        reshape_and_cache(k, k, cache, cache.clone(), torch.tensor([0, 1]), backend="cpu")
    if torch.cuda.is_available():
        q, k_cache, v_cache, tables, lens = _case(2, 4, 2, 16, 8, torch.float32, 20, device="cuda")
        with pytest.raises(ValueError, match="backend='cpu' cannot run on cuda tensors"):
            paged_attention(q, k_cache, v_cache, tables, lens, backend="cpu")
