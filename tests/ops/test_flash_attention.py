"""FlashAttention (Triton forward and backward) against float64 attention, by FlashAttention's rule.

The kernel's error against a float64 reference, for the output and every gradient, may be at
most twice PyTorch's own error at the same precision (the same math in the input dtype) plus a
small atol. On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here when
there is no GPU and it is not set already), with small shapes and a pairwise covering design of
the sweep; on a GPU the same tests run compiled, bf16 included.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import math
import os

import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it at import
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PARALLAX_FLASH_AUTOTUNE", "0")  # one config per kernel: bounded compile time on GPUs

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from parallax import ops  # noqa: E402
from parallax.ops import flash_attention, flash_attention_ref, flash_attention_varlen  # noqa: E402
from tests.helpers import CUDA, assert_close, triton_interpreter_problem  # noqa: E402

fa = importlib.import_module("parallax.ops.flash_attention")  # the module (the package exports the function)

DEVICE = "cuda" if CUDA else "cpu"
INTERPRETER_PROBLEM = None if CUDA else triton_interpreter_problem()
KERNEL = ops.backend("flash_attention", DEVICE) == "triton" and INTERPRETER_PROBLEM is None
needs_kernel = pytest.mark.skipif(not KERNEL, reason=INTERPRETER_PROBLEM or (
    "no GPU and TRITON_INTERPRET is not enabled: the Triton kernels cannot run here"))
# Triton's interpreter (3.6 to 3.9 at least) computes tl.dot on bf16 operands from their raw bits:
# garbage, while bf16 loads, stores and casts are right. bf16 is tested compiled, on GPUs only.
BF16_REASON = "Triton's interpreter returns garbage for tl.dot on bf16 operands (bf16 is tested on GPU)"
needs_bf16_dot = pytest.mark.skipif(not CUDA, reason=BF16_REASON)

# atol added to 2x PyTorch's own error (that error can be 0, e.g. a single key copies v exactly)
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


# --------------------------------------------------------------------------------------------
# helpers


def _inputs(B, S_q, S_k, H, H_kv, D, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S_q, H, D, generator=gen)
    k = torch.randn(B, S_k, H_kv, D, generator=gen)
    v = torch.randn(B, S_k, H_kv, D, generator=gen)
    do = torch.randn(B, S_q, H, D, generator=gen)
    return [t.to(device, dtype) for t in (q, k, v, do)]


def _run(fn, q, k, v, do, **kw):
    """Output and (dq, dk, dv) of ``fn`` on leaf copies of q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, do) if out.numel() else [torch.zeros_like(t) for t in leaves]
    return [out.detach(), *grads]


def _attention_in_dtype(q, k, v, causal=False, softmax_scale=None):
    """PyTorch's own attention at the input precision, every step (scores, softmax, P@V) rounded to
    the input dtype: the baseline of FlashAttention's rule (its tests' ``attention_ref`` with
    ``upcast=False``). q (B, S_q, H, D), k/v (B, S_k, H_kv, D) -> (B, S_q, H, D)."""
    S_q, H, D = q.shape[1:]
    S_k, H_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(H // H_kv, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(H // H_kv, dim=1)
    scores = (qh @ kh.transpose(-2, -1)) * scale  # (B, H, S_q, S_k)
    allowed = torch.ones(S_q, S_k, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(S_k - S_q)  # bottom-right aligned
    empty = ~allowed.any(-1, keepdim=True)  # rows without keys: output 0, no gradient
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(empty, 0.0)
    p = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    return (p @ vh).transpose(1, 2)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check_rule(got, pytorch, exact, dtype, what=""):
    """FlashAttention's rule for the output and each gradient: err <= 2 x PyTorch's err + atol."""
    for name, g, p, e in zip(("out", "dq", "dk", "dv"), got, pytorch, exact):
        assert g.dtype == dtype and g.shape == e.shape, f"{what} {name}: {g.dtype} {tuple(g.shape)}"
        assert torch.isfinite(g).all(), f"{what} {name}: non-finite values"
        err, ref_err = _max_err(g, e), _max_err(p, e)
        bound = 2 * ref_err + ATOL[dtype]
        assert err <= bound, (f"{what} {name}: max error {err:.3g} vs float64 exceeds 2 x PyTorch's {dtype} "
                              f"error {ref_err:.3g} + {ATOL[dtype]}")


def _against_float64(B, S_q, S_k, H, H_kv, D, causal, dtype, seed=0):
    q, k, v, do = _inputs(B, S_q, S_k, H, H_kv, D, dtype, seed)
    got = _run(flash_attention, q, k, v, do, causal=causal)
    pytorch = _run(_attention_in_dtype, q, k, v, do, causal=causal)
    exact = _run(flash_attention_ref, *(t.double() for t in (q, k, v, do)), causal=causal)
    _check_rule(got, pytorch, exact, dtype, f"B={B} S_q={S_q} S_k={S_k} H={H}/{H_kv} D={D} causal={causal}")


# --------------------------------------------------------------------------------------------
# the sweep: a pairwise covering design of the full product (the product itself is for GPUs)

SEQLENS = [(1, 1), (17, 17), (97, 97), (128, 128), (203, 203), (1, 128), (97, 17), (17, 203), (203, 97)]
HEAD_DIMS = [8, 40, 64, 72, 128]
GROUPS = [("mha", 2, 2), ("gqa", 4, 2), ("mqa", 3, 1)]
CAUSAL = [False, True]
# fp16 first: the greedy design fills free slots with the first value, and fp16 compiles (tensor
# cores) much faster on GPUs than fp32 (exact FMA dots)
DTYPES = [torch.float16, torch.float32]


def _pairwise(factors: list[list]) -> list[tuple]:
    """A small set of rows of the product of ``factors`` in which every pair of values of every
    two factors appears at least once (greedy, deterministic)."""
    todo = {(i, a, j, b) for i, j in itertools.combinations(range(len(factors)), 2)
            for a in range(len(factors[i])) for b in range(len(factors[j]))}
    rows = []
    candidates = list(itertools.product(*(range(len(f)) for f in factors)))

    def gain(c, todo):
        return sum((i, c[i], j, c[j]) in todo for i, j in itertools.combinations(range(len(c)), 2))

    while todo:
        best = max(candidates, key=functools.partial(gain, todo=todo))
        todo -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(best)), 2)}
        rows.append(tuple(f[x] for f, x in zip(factors, best)))
    return rows


CASES = _pairwise([SEQLENS, HEAD_DIMS, GROUPS, CAUSAL, DTYPES])


def _case_id(case) -> str:
    (S_q, S_k), D, (group, _, _), causal, dtype = case
    return f"{S_q}x{S_k}-d{D}-{group}-{'causal' if causal else 'full'}-{str(dtype).removeprefix('torch.')}"


def test_covering_design_covers_every_pair():
    assert len(CASES) <= 60
    factors = [SEQLENS, HEAD_DIMS, GROUPS, CAUSAL, DTYPES]
    for i, j in itertools.combinations(range(len(factors)), 2):
        seen = {(c[i], c[j]) for c in CASES}
        assert seen == set(itertools.product(factors[i], factors[j]))


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64_reference(case):
    (S_q, S_k), D, (_, H, H_kv), causal, dtype = case
    B = 2 if max(S_q, S_k) < 128 else 1
    _against_float64(B, S_q, S_k, H, H_kv, D, causal, dtype, seed=S_q * 1000 + S_k + D)


@needs_kernel
@needs_bf16_dot
@pytest.mark.parametrize("case", CASES if CUDA else CASES[:1], ids=_case_id)
def test_bf16_matches_float64_reference(case):
    (S_q, S_k), D, (_, H, H_kv), causal, _ = case
    B = 2 if max(S_q, S_k) < 128 else 1
    _against_float64(B, S_q, S_k, H, H_kv, D, causal, torch.bfloat16, seed=S_q * 1000 + S_k + D)


@needs_kernel
@pytest.mark.parametrize("D", [16, 256] if not CUDA else list(range(8, 257, 8)))
def test_every_head_dim(D):
    """Power-of-two and padded head dims at the ends of the range (all 32 of them on GPU)."""
    _against_float64(1, 33, 21, 2, 1, D, True, torch.float32 if not CUDA else torch.float16, seed=D)


@needs_kernel
@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 2),
    S_q=st.integers(1, 70),
    S_k=st.integers(1, 70),
    H_kv=st.integers(1, 2),
    group=st.integers(1, 3),
    D=st.sampled_from([8, 24, 32, 48, 56, 80, 96]),
    causal=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_random_shapes(B, S_q, S_k, H_kv, group, D, causal, dtype):
    _against_float64(B, S_q, S_k, H_kv * group, H_kv, D, causal, dtype, seed=S_q + 7 * S_k)


# --------------------------------------------------------------------------------------------
# semantics: lse, rows with no key, causal alignment, strides, determinism


@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
def test_return_lse_matches_reference(causal):
    q, k, v, _ = _inputs(2, 45, 30, 4, 2, 32, torch.float32, seed=3)
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    out64, lse64 = flash_attention_ref(q.double(), k.double(), v.double(), causal=causal, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 45)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse64))
    finite = torch.isfinite(lse64)
    assert_close(lse[finite], lse64[finite], atol=1e-5, rtol=1e-6, name="lse")
    assert_close(out, out64, atol=1e-5, name="out")
    assert not lse.requires_grad


@needs_kernel
def test_rows_without_keys_are_zero_with_zero_gradient():
    # causal with S_q > S_k, aligned bottom-right: query i sees keys j <= i - (S_q - S_k)
    S_q, S_k = 40, 9
    q, k, v, do = _inputs(1, S_q, S_k, 2, 1, 16, torch.float32, seed=5)
    out, dq, dk, dv = _run(flash_attention, q, k, v, do, causal=True)
    _, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    empty = S_q - S_k
    assert torch.equal(out[:, :empty], torch.zeros_like(out[:, :empty]))
    assert torch.equal(dq[:, :empty], torch.zeros_like(dq[:, :empty]))
    assert torch.isneginf(lse[..., :empty]).all() and torch.isfinite(lse[..., empty:]).all()
    # the first row that sees a key sees exactly key 0: its output is v[:, 0]
    assert_close(out[:, empty], v[:, 0].expand_as(out[:, empty]), atol=1e-6, name="first row")
    ref = _run(flash_attention_ref, *(t.double() for t in (q, k, v, do)), causal=True)
    for name, g, e in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
        assert_close(g, e, atol=2e-5, name=name)


@needs_kernel
def test_causal_mask_is_bottom_right_aligned():
    # S_q < S_k (a KV cache): the last query sees every key, so it equals non-causal attention
    q, k, v, _ = _inputs(1, 5, 50, 2, 2, 32, torch.float32, seed=9)
    causal = flash_attention(q, k, v, causal=True)
    full = flash_attention(q, k, v, causal=False)
    assert_close(causal[:, -1], full[:, -1], atol=1e-6, name="last row")
    # and query i equals attention over keys [0, i + S_k - S_q] only
    for i in range(5):
        alone = flash_attention(q[:, i:i + 1], k[:, :i + 46], v[:, :i + 46])
        assert_close(causal[:, i], alone[:, 0], atol=1e-6, name=f"row {i}")


@needs_kernel
def test_non_contiguous_inputs_read_through_strides():
    B, S, H, H_kv, D = 2, 37, 4, 2, 24
    gen = torch.Generator().manual_seed(11)
    # q from a (B, H, S, D) tensor, k and v slices of one fused projection, do transposed too
    q = torch.randn(B, H, S, D, generator=gen).to(DEVICE).transpose(1, 2)
    kv = torch.randn(B, S, 2 * H_kv, D + 8, generator=gen).to(DEVICE)
    k, v = kv[:, :, :H_kv, 4:D + 4], kv[:, :, H_kv:, :D]
    do = torch.randn(B, H, S, D, generator=gen).to(DEVICE).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, do))
    got = _run(flash_attention, q, k, v, do, causal=True)
    dense = _run(flash_attention, *(t.contiguous() for t in (q, k, v, do)), causal=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, dense):
        assert_close(a, b, atol=0.0, name=name)  # the same arithmetic, only the addresses differ
    # a batch broadcast by stride 0 (expand) gives the sum of the batch's gradients
    k1, v1 = k[:1].expand(B, -1, -1, -1), v[:1].expand(B, -1, -1, -1)
    out = flash_attention(q, k1, v1)
    assert_close(out, flash_attention(q, k1.contiguous(), v1.contiguous()), atol=0.0, name="expanded")


@needs_kernel
def test_backward_is_deterministic():
    q, k, v, do = _inputs(1, 70, 70, 4, 1, 32, torch.float16, seed=2)
    first = _run(flash_attention, q, k, v, do, causal=True)
    second = _run(flash_attention, q, k, v, do, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_kernel
def test_softmax_scale():
    q, k, v, do = _inputs(1, 19, 23, 2, 2, 16, torch.float32, seed=4)
    got = _run(flash_attention, q, k, v, do, softmax_scale=0.3)
    exact = _run(flash_attention_ref, *(t.double() for t in (q, k, v, do)), softmax_scale=0.3)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, exact):
        assert_close(a, b, atol=2e-5, name=name)


@needs_kernel
def test_empty_sizes():
    q, k, v, _ = _inputs(1, 0, 5, 2, 2, 16, torch.float32)
    assert flash_attention(q, k, v).shape == (1, 0, 2, 16)
    q, k, v, do = _inputs(1, 6, 0, 2, 2, 16, torch.float32)  # no keys at all: every row is empty
    out, dq, dk, dv = _run(flash_attention, q, k, v, do)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(dq, torch.zeros_like(dq))
    assert dk.shape == k.shape and dv.shape == v.shape


# --------------------------------------------------------------------------------------------
# varlen


def _packed(lengths_q, lengths_k, H, H_kv, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(lengths_q), sum(lengths_k)
    q, k, v = (torch.randn(n, h, D, generator=gen).to(DEVICE, dtype) for n, h in ((tq, H), (tk, H_kv), (tk, H_kv)))
    do = torch.randn(tq, H, D, generator=gen).to(DEVICE, dtype)
    cu = [torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device=DEVICE)
          for n in (lengths_q, lengths_k)]
    return q, k, v, do, cu[0], cu[1]


@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_equals_each_sequence_alone(causal, dtype):
    lengths_q, lengths_k = [13, 0, 40, 1, 27], [13, 5, 31, 33, 0]  # S_q ==, <, > S_k; empty sequences
    H, H_kv, D = 4, 2, 40
    q, k, v, do, cu_q, cu_k = _packed(lengths_q, lengths_k, H, H_kv, D, dtype, seed=21)
    packed = _run(flash_attention_varlen, q, k, v, do, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k), causal=causal)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(lengths_q)):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        alone = _run(flash_attention, q[None, sq], k[None, sk], v[None, sk], do[None, sq], causal=causal)
        for name, p, a, rows in zip(("out", "dq", "dk", "dv"), packed, alone, (sq, sq, sk, sk)):
            assert_close(p[rows], a[0], atol=1e-6 if dtype == torch.float32 else 1e-3, name=f"seq {b} {name}")
    ref = fa.flash_attention_varlen_ref(q.double(), k.double(), v.double(), cu_q, cu_k, max(lengths_q),
                                        max(lengths_k), causal=causal)
    assert_close(packed[0], ref, atol=1e-5 if dtype == torch.float32 else 2e-3, name="out vs reference")


@needs_kernel
def test_varlen_ignores_tokens_past_the_last_sequence():
    q, k, v, do, cu_q, cu_k = _packed([9, 6], [9, 6], 2, 2, 16, torch.float32, seed=8)
    out, dq, dk, dv = _run(flash_attention_varlen, q, k, v, do, cu_seqlens_q=cu_q[:2], cu_seqlens_k=cu_k[:2],
                           max_seqlen_q=9, max_seqlen_k=9)
    assert torch.equal(dk[9:], torch.zeros_like(dk[9:])) and torch.equal(dv[9:], torch.zeros_like(dv[9:]))
    assert torch.equal(dq[9:], torch.zeros_like(dq[9:])) and torch.equal(out[9:], torch.zeros_like(out[9:]))
    assert_close(out[:9], flash_attention(q[None, :9], k[None, :9], v[None, :9])[0], atol=1e-6, name="out")


# --------------------------------------------------------------------------------------------
# errors, dispatch


def test_bad_inputs_name_the_argument():
    q, k, v, _ = _inputs(1, 8, 8, 4, 2, 16, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="k has dtype torch.float16"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="v has dtype"):
        flash_attention(q, k, v.double())
    with pytest.raises(ValueError, match="q has dtype torch.int64"):
        flash_attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="not a multiple of the 3 heads"):
        flash_attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match=r"q must be 4-D \(batch, seqlen, heads, head_dim\), got shape \(8, 4, 16\)"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        flash_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="k has shape .* but v has"):
        flash_attention(q, k, v[:, :5])
    with pytest.raises(ValueError, match="k has batch size 2 but q has 1"):
        flash_attention(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))
    for D in (12, 264):
        x = torch.zeros(1, 4, 2, D)
        with pytest.raises(ValueError, match=rf"head dim D={D} is not supported; .*8, 16, 24, .*, 248, 256"):
            flash_attention(x, x, x)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        flash_attention(q, k, None)


def test_bad_varlen_inputs_name_the_argument():
    q, k, v = torch.zeros(10, 2, 16), torch.zeros(12, 2, 16), torch.zeros(12, 2, 16)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q must be a 1-D int32 tensor"):
        flash_attention_varlen(q, k, v, cu_q.long(), cu_k, 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_q has 3 entries but cu_seqlens_k has 2"):
        flash_attention_varlen(q, k, v, cu_q, cu_k[:2], 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0, never decrease"):
        flash_attention_varlen(q, k, v, cu_q, torch.tensor([0, 6, 13], dtype=torch.int32), 6, 7)
    with pytest.raises(ValueError, match="more than max_seqlen 5"):
        flash_attention_varlen(q, k, v, cu_q, cu_k, 5, 6)
    with pytest.raises(ValueError, match="max_seqlen_k must be a non-negative int"):
        flash_attention_varlen(q, k, v, cu_q, cu_k, 6, 6.0)
    with pytest.raises(ValueError, match=r"q must be 3-D \(total_tokens, heads, head_dim\)"):
        flash_attention_varlen(q[None], k, v, cu_q, cu_k, 6, 6)


def test_backend_follows_the_interpreter_switch(monkeypatch):
    assert ops.backend("flash_attention", "cpu") == ("triton" if os.environ.get("TRITON_INTERPRET") == "1"
                                                    else "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend("flash_attention", "cpu") == "reference"
    # the reference path: plain PyTorch, same results, gradients through autograd
    q, k, v, do = _inputs(1, 9, 12, 2, 1, 8, torch.float32, device="cpu")
    got = _run(flash_attention, q, k, v, do, causal=True)
    ref = _run(flash_attention_ref, q, k, v, do, causal=True)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    if CUDA:
        assert ops.backend("flash_attention", "cuda") == "triton"


# --------------------------------------------------------------------------------------------
# the reference GPT


@needs_kernel
@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_gpt_flash_backend_matches_sdpa(n_kv_head):
    from parallax.models import GPT, GPTConfig

    def config(attention):
        return GPTConfig(block_size=32, vocab_size=61, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64,
                         dropout=0.0, attention=attention)

    torch.manual_seed(n_kv_head)
    sdpa = GPT(config("sdpa")).to(DEVICE)
    flash = GPT(config("flash")).to(DEVICE)
    flash.load_state_dict(sdpa.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 61, (2, 29), generator=gen).to(DEVICE)
    y = torch.randint(0, 61, (2, 29), generator=gen).to(DEVICE)
    assert_close(flash(x), sdpa(x), atol=1e-5, name="logits")
    flash(x, y).backward()
    sdpa(x, y).backward()
    grads = dict(sdpa.named_parameters())
    for name, p in flash.named_parameters():
        assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, name=name)


def test_gpt_auto_backend_is_sdpa_on_cpu_and_flash_on_cuda(monkeypatch):
    from models import attention

    assert attention.ATTENTION_BACKENDS["auto"] is attention.auto_attention
    from parallax.models import GPTConfig

    assert GPTConfig().attention == "auto"
    calls = []
    monkeypatch.setattr(attention, "flash_attention", lambda *a, **kw: calls.append("flash"))
    monkeypatch.setattr(attention, "sdpa_attention", lambda *a, **kw: calls.append("sdpa"))
    q = torch.zeros(1, 2, 3, 16)
    attention.auto_attention(q, q, q)
    attention.auto_attention(q, q, q, 0.1)
    assert calls == ["sdpa", "sdpa"]
    if CUDA:
        qc = q.cuda()
        attention.auto_attention(qc, qc, qc)
        attention.auto_attention(qc, qc, qc, 0.1)  # attention dropout: the kernel has none
        attention.auto_attention(torch.zeros(1, 2, 3, 12, device="cuda"), qc, qc)  # head size it does not take
        assert calls[2:] == ["flash", "sdpa", "sdpa"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_meets_the_error_rule_against_pytorch_sdpa(dtype):
    """The CPU fallback computes in fp32: at most 2x the error of PyTorch's own SDPA at the same
    precision (rounding scores, softmax and P@V to bf16 gave 2.3e-2 against an allowed 2 x 9.8e-3)."""
    q, k, v, do = _inputs(4, 512, 256, 6, 1, 40, dtype, seed=5, device="cpu")
    for causal in (False, True):
        got = _run(flash_attention_ref, q, k, v, do, causal=causal)
        pytorch = _run(_sdpa, q, k, v, do, causal=causal)
        exact = _run(flash_attention_ref, *(t.double() for t in (q, k, v, do)), causal=causal)
        _check_rule(got, pytorch, exact, dtype, f"reference causal={causal}")


def _sdpa(q, k, v, causal=False):
    """torch's scaled_dot_product_attention in flash_attention's layout (causal bottom-right)."""
    S_q, S_k = q.shape[1], k.shape[1]
    mask = torch.ones(S_q, S_k, dtype=torch.bool).tril(S_k - S_q) if causal else None
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def test_gpt_flash_backend_rejects_attention_dropout():
    from models.attention import flash_attention as flash_backend

    q = torch.zeros(1, 2, 3, 16)
    with pytest.raises(ValueError, match="no attention dropout"):
        flash_backend(q, q, q, 0.1)


# --------------------------------------------------------------------------------------------
# GPU only: every autotuning candidate, compiled


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the autotuning candidates are GPU configurations)")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("D", [64, 128, 256])
def test_every_autotuning_candidate(D, index, causal, monkeypatch):
    """Candidate ``index`` of each kernel's list for this head dim (one test each, so that
    pytest-xdist spreads their compilation over processes)."""
    monkeypatch.setenv("PARALLAX_FLASH_AUTOTUNE", "0")  # launch default_config, patched below
    kernels = importlib.import_module("parallax.kernels.flash_attention")
    candidates = {kind: kernels._candidates(kind, D, 2) for kind in ("fwd", "dkdv", "dq")}
    if index >= max(len(c) for c in candidates.values()):
        pytest.skip(f"D={D} has {max(len(c) for c in candidates.values())} candidates that fit this GPU")
    monkeypatch.setattr(kernels, "default_config",
                        lambda kind, block_d, itemsize: candidates[kind][index % len(candidates[kind])])
    _against_float64(1, 300, 257, 4, 2, D, causal, torch.bfloat16, seed=index)
