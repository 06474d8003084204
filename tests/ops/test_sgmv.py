"""The batched multi-LoRA kernels (``sgmv``, Punica's SGMV: Triton, and C++ on CPU) against
their definition.

The definition is a per-token loop written here in float64: ``delta[t] = scaling[i] * (x[t] @
A[i]^T) @ B[i]^T`` for ``i = indices[t] >= 0``, zero for -1. A kernel's error against it may be
at most twice the error of PyTorch's own computation at the input precision (``sgmv_ref``) plus a
small atol; ``sgmv_ref`` is checked against the definition too. The shared tests run on every
kernel the device has (the ``kernel`` fixture): on CPU the C++ kernel (``backend="cpu"``) and the
Triton kernels under Triton's interpreter (TRITON_INTERPRET=1, set here when there is no GPU and
it is not set already) with small shapes, in fp32 and fp16; on a GPU the Triton kernels compiled,
bf16 included. The C++ kernel's own section runs it on every instruction set the CPU has, in
every dtype, at odd sizes and layouts.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import importlib  # noqa: E402

from parallax import _extension, ops  # noqa: E402
from parallax.ops import sgmv, sgmv_add_, sgmv_ref  # noqa: E402
from parallax.ops.sgmv import SgmvPlan, sgmv_plan  # noqa: E402
from tests.helpers import CUDA, assert_error_within_twice_pytorch, triton_interpreter_problem  # noqa: E402

sgmv_module = importlib.import_module("parallax.ops.sgmv")  # the module (parallax.ops.sgmv is also the function)

DEVICE = "cuda" if CUDA else "cpu"
INTERPRETER_PROBLEM = None if CUDA else triton_interpreter_problem()
TRITON = "triton" in sgmv_module._available(DEVICE) and INTERPRETER_PROBLEM is None
CPU_KERNEL = _extension.has_kernel("sgmv", "cpu")
# The kernels the shared tests run on this device
KERNELS = (["cpu"] if DEVICE == "cpu" and CPU_KERNEL else []) + (["triton"] if TRITON else [])
KERNEL = bool(KERNELS)
needs_kernel = pytest.mark.skipif(not KERNEL, reason=INTERPRETER_PROBLEM or (
    "no GPU, no compiled CPU kernel and TRITON_INTERPRET is not enabled: no sgmv kernel can run here"))
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled kernels at Llama sizes)")
# Triton's interpreter computes tl.dot on bf16 operands from their raw bits (see test_flash_attention)
needs_bf16_dot = pytest.mark.skipif(not CUDA, reason="Triton's interpreter returns garbage for tl.dot on bf16 "
                                                     "operands (bf16 is tested on GPU)")

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(params=KERNELS or [pytest.param(None, marks=pytest.mark.skip(reason="no sgmv kernel runs here"))])
def kernel(request) -> str:
    """Each sgmv kernel this device runs ('cpu', 'triton')."""
    return request.param


def definition(x, lora_a, lora_b, indices, scaling):
    """The per-token loop, in float64 on the CPU."""
    x, lora_a, lora_b, scaling = (v.detach().double().cpu() for v in (x, lora_a, lora_b, scaling))
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=torch.float64)
    for t, i in enumerate(indices.tolist()):
        if i >= 0:
            out[t] = scaling[i] * ((x[t] @ lora_a[i].T) @ lora_b[i].T)
    return out


def _inputs(t, k, n, r, s, dtype, *, seed, indices=None, adapter_dtype=None, device=DEVICE):
    """x, lora_a, lora_b, indices (random in [-1, s) unless given) and scaling, fresh random."""
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(t, k, generator=gen).to(device, dtype)
    lora_a = (torch.randn(s, r, k, generator=gen) * max(k, 1) ** -0.5).to(device, adapter_dtype)
    lora_b = (torch.randn(s, n, r, generator=gen) * r ** -0.5).to(device, adapter_dtype)
    if indices is None:
        indices = torch.randint(-1, s, (t,), generator=gen)
    scaling = torch.rand(s, generator=gen) * 2 + 0.5  # one per adapter, all different
    return x, lora_a, lora_b, torch.as_tensor(indices, dtype=torch.int64).to(device), scaling.to(device)


def _check_against_definition(inputs, *, name="", **kw):
    """The kernel within twice PyTorch's error of the float64 definition, and sgmv_ref close to it."""
    x, lora_a, lora_b, indices, scaling = inputs
    got = sgmv(*inputs, **kw)
    pytorch = sgmv_ref(*inputs)
    exact = definition(*inputs)
    assert got.device == x.device
    assert_error_within_twice_pytorch(got, pytorch, exact, atol=ATOL[lora_a.dtype], name=name)
    ref_err = (pytorch.double().cpu() - exact).abs().max().item() if exact.numel() else 0.0
    assert ref_err <= 0.05 * max(1.0, exact.abs().max().item() if exact.numel() else 0.0), name
    off = (indices < 0).cpu()
    assert torch.equal(got.cpu()[off], torch.zeros_like(got.cpu()[off])), f"{name}: tokens without an adapter"
    return got


# --------------------------------------------------------------------------------------------
# against the definition

# (T, K, N, R, S): odd sizes, K and N not multiples of any block, R from 1 to past one rank block,
# slot counts 1 to 9
CASES = [(1, 33, 65, 1, 1), (7, 65, 33, 8, 2), (37, 45, 29, 3, 5), (97, 33, 65, 16, 9), (20, 17, 9, 64, 4),
         (50, 40, 130, 70, 3),  # R = 70: two rank blocks; N = 130: three column blocks
         (150, 24, 24, 5, 1)]   # one long segment: three 64-row tiles, the last partial


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_definition(case, dtype, kernel):
    t, k, n, r, s = case
    _check_against_definition(_inputs(t, k, n, r, s, dtype, seed=t + k + n + r + s), name=f"{case} {dtype}",
                              backend=kernel)


@needs_bf16_dot
@pytest.mark.parametrize("case", CASES, ids=str)
def test_bf16_matches_definition(case):
    t, k, n, r, s = case
    _check_against_definition(_inputs(t, k, n, r, s, torch.bfloat16, seed=k * n + r), name=f"{case} bf16")


@pytest.mark.parametrize("slots", range(1, 10))
def test_every_slot_count_with_all_slots_present(slots, kernel):
    """1..9 adapters, each used by a few tokens, interleaved with base tokens in a shuffled order."""
    gen = torch.Generator().manual_seed(slots)
    indices = torch.arange(-1, slots).repeat(3)[torch.randperm(3 * (slots + 1), generator=gen)]
    _check_against_definition(_inputs(len(indices), 19, 23, 4, slots, torch.float32, seed=slots, indices=indices),
                              name=f"{slots} slots", backend=kernel)


def test_interleaved_non_contiguous_slots(kernel):
    """Tokens of slots 7, 2 and 4 (of 9) alternate token by token, with base tokens between: the
    other slots are never used, so their adapters must not leak in."""
    indices = [7, 2, 7, -1, 4, 2, 2, 7, -1, -1, 4, 7, 2, 4, 4, 7, -1, 2, 7, 4]
    inputs = _inputs(len(indices), 21, 18, 6, 9, torch.float32, seed=3, indices=indices)
    got = _check_against_definition(inputs, name="interleaved", backend=kernel)
    x, lora_a, lora_b, idx, scaling = inputs
    for slot in (2, 4, 7):  # each token equals that slot's adapter applied alone
        rows = (idx == slot).nonzero().flatten()
        alone = float(scaling[slot]) * (x[rows] @ lora_a[slot].T) @ lora_b[slot].T
        torch.testing.assert_close(got[rows], alone, atol=1e-5, rtol=1e-5)


def test_one_adapter_for_every_token(kernel):
    inputs = _inputs(40, 31, 27, 8, 3, torch.float32, seed=4, indices=[1] * 40)
    got = _check_against_definition(inputs, name="one adapter", backend=kernel)
    x, lora_a, lora_b, _, scaling = inputs
    torch.testing.assert_close(got, float(scaling[1]) * (x @ lora_a[1].T) @ lora_b[1].T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [0, 1, 13])
def test_no_adapter_gives_zeros(t, kernel):
    inputs = _inputs(t, 16, 24, 4, 3, torch.float32, seed=t, indices=[-1] * t)
    got = sgmv(*inputs, backend=kernel)
    assert got.shape == (t, 24) and got.dtype == torch.float32
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("k,n", [(0, 12), (12, 0)], ids=["K=0", "N=0"])
def test_empty_inner_or_output_dim(k, n, kernel):
    inputs = _inputs(9, k, n, 3, 2, torch.float32, seed=k + n)
    got = sgmv(*inputs, backend=kernel)
    assert got.shape == (9, n) and torch.equal(got, torch.zeros_like(got))


def test_no_slots_at_all(kernel):
    """S = 0 (no adapter loaded): every token is a base token."""
    x, _, _, _, _ = _inputs(5, 16, 24, 4, 1, torch.float32, seed=0)
    got = sgmv(x, x.new_zeros(0, 4, 16), x.new_zeros(0, 24, 4), torch.full((5,), -1, device=DEVICE),
               x.new_zeros(0), backend=kernel)
    assert torch.equal(got, x.new_zeros(5, 24))


# --------------------------------------------------------------------------------------------
# dtypes, layouts, plans


@pytest.mark.parametrize("x_dtype,adapter_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)],
                         ids=["fp16-x-fp32-adapters", "fp32-x-fp16-adapters"])
def test_mixed_dtypes_follow_the_adapters(x_dtype, adapter_dtype, kernel):
    """x is cast to the adapters' dtype (PEFT keeps 16-bit models' adapters in fp32); the result
    is in the adapters' dtype."""
    inputs = _inputs(23, 40, 36, 8, 3, x_dtype, adapter_dtype=adapter_dtype, seed=8)
    got = _check_against_definition(inputs, name=f"{x_dtype} x {adapter_dtype} adapters", backend=kernel)
    assert got.dtype == adapter_dtype


def test_int32_indices_and_strided_operands(kernel):
    """int32 indices; x a column slice of a wider tensor, the adapters transposed views (any
    strides are read as they are)."""
    x, lora_a, lora_b, indices, scaling = _inputs(29, 24, 20, 5, 4, torch.float32, seed=9)
    wide_x = torch.cat([x, x.flip(1)], dim=1)[:, :24]
    a_t = lora_a.transpose(1, 2).contiguous().transpose(1, 2)  # (S, R, K) with K the slow dim
    b_t = lora_b.transpose(1, 2).contiguous().transpose(1, 2)
    assert not wide_x.is_contiguous() and not a_t.is_contiguous() and not b_t.is_contiguous()
    got = _check_against_definition((wide_x, a_t, b_t, indices.int(), scaling), name="strided int32", backend=kernel)
    torch.testing.assert_close(got, sgmv(x, lora_a, lora_b, indices, scaling, backend=kernel), atol=1e-6, rtol=1e-6)


def test_result_is_inference_only(kernel):
    x, lora_a, lora_b, indices, scaling = _inputs(9, 16, 16, 4, 2, torch.float32, seed=10)
    got = sgmv(x.requires_grad_(), lora_a.requires_grad_(), lora_b, indices, scaling, backend=kernel)
    assert not got.requires_grad and got.grad_fn is None


def test_a_plan_serves_every_layer_of_a_step(kernel):
    """One plan per indices, reused for layers of other K, N and R: the same results as without."""
    indices = torch.tensor([3, -1, 0, 3, 3, 1, -1, 0, 2, 3, 1, 1], device=DEVICE)
    plan = sgmv_plan(indices, 4)
    for k, n, r in [(16, 40, 4), (40, 16, 8), (33, 33, 1)]:
        inputs = _inputs(len(indices), k, n, r, 4, torch.float32, seed=k + n, indices=indices)
        torch.testing.assert_close(sgmv(*inputs, plan=plan, backend=kernel), sgmv(*inputs, backend=kernel), atol=0, rtol=0)
        torch.testing.assert_close(sgmv(*inputs, plan=plan, backend="reference"), sgmv_ref(*inputs),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_plan_tiles_cover_each_adapter_token_once(seed):
    """The tiles partition the sorted positions of the tokens with an adapter: one slot per tile,
    at most block_m rows, every such token in exactly one tile, base tokens in none."""
    gen = torch.Generator().manual_seed(seed)
    s = 1 + seed
    t = int(torch.randint(0, 300, (1,), generator=gen))
    indices = torch.randint(-1, s, (t,), generator=gen)
    plan = sgmv_plan(indices, s)
    assert isinstance(plan, SgmvPlan) and torch.equal(indices[plan.order], indices.sort(stable=True).values)
    covered = torch.zeros(t, dtype=torch.int64)
    for slot, start, end in zip(plan.tile_slot.tolist(), plan.tile_start.tolist(), plan.tile_end.tolist()):
        assert 0 <= end - start <= plan.block_m
        if end > start:
            tokens = plan.order[start:end]
            assert (indices[tokens] == slot).all(), (slot, indices[tokens])
            covered[tokens] += 1
    assert torch.equal(covered, (indices >= 0).long())


# --------------------------------------------------------------------------------------------
# dispatch and bad input


def test_backends():
    inputs = _inputs(11, 16, 24, 4, 3, torch.float32, seed=12, device="cpu")
    assert torch.equal(sgmv(*inputs, backend="reference"), sgmv_ref(*inputs))
    with pytest.raises(ValueError, match="backend must be one of 'cpu', 'triton', 'reference' or None, got 'Triton'"):
        sgmv(*inputs, backend="Triton")
    # the compiled CPU kernel first on CPU whenever the extension has it (the test image always does)
    assert CPU_KERNEL and ops.backend("sgmv", "cpu") == "cpu"
    if CUDA:
        assert ops.backend("sgmv", "cuda") == "triton"


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_cpu_without_the_compiled_kernel(monkeypatch, interpret):
    """When parallax._C did not load: Triton under the interpreter, else the reference; backend='cpu'
    is then refused by name."""
    monkeypatch.setattr(sgmv_module, "_has_cpu_kernel", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    want = "triton" if interpret == "1" and sgmv_module._triton.triton_importable() else "reference"
    assert ops.backend("sgmv", "cpu") == want
    inputs = _inputs(11, 16, 24, 4, 3, torch.float32, seed=13, device="cpu")
    if want == "reference":
        assert torch.equal(sgmv(*inputs), sgmv_ref(*inputs))
        with pytest.raises(ValueError, match="backend='triton' cannot run on cpu tensors here"):
            sgmv(*inputs, backend="triton")
    with pytest.raises(ValueError, match="backend='cpu' cannot run on cpu tensors here .*available: " + want):
        sgmv(*inputs, backend="cpu")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_the_cpu_kernel_refuses_cuda_tensors():
    x, lora_a, lora_b, indices, scaling = _inputs(6, 8, 10, 4, 3, torch.float32, seed=15, device="cuda")
    with pytest.raises(ValueError, match="backend='cpu' cannot run on cuda tensors"):
        sgmv(x, lora_a, lora_b, indices, scaling, backend="cpu")


def _bad(**change):
    """Valid inputs (T=6, K=8, N=10, R=4, S=3) with some replaced."""
    x, lora_a, lora_b, indices, scaling = _inputs(6, 8, 10, 4, 3, torch.float32, seed=14, device="cpu")
    args = dict(x=x, lora_a=lora_a, lora_b=lora_b, indices=indices, scaling=scaling)
    args.update(change)
    return args


BAD = [
    (dict(x=torch.zeros(2, 3, 8)), r"x must have shape \(T, K\)"),
    (dict(x=torch.zeros(6, 8, dtype=torch.float64)), "x has dtype torch.float64"),
    (dict(x=[[0.0] * 8] * 6), "x must be a torch.Tensor"),
    (dict(lora_a=torch.zeros(3, 4, 9)), r"lora_a must have shape \(S, R, K\) with R >= 1 and K=8"),
    (dict(lora_a=torch.zeros(3, 0, 8)), r"lora_a must have shape \(S, R, K\) with R >= 1"),
    (dict(lora_a=torch.zeros(4, 8)), "lora_a must have shape"),
    (dict(lora_b=torch.zeros(3, 10, 5)), r"lora_b must have shape \(S, N, R\) with S=3 and R=4"),
    (dict(lora_b=torch.zeros(2, 10, 4)), "lora_b must have shape"),
    (dict(lora_b=torch.zeros(3, 10, 4, dtype=torch.float16)), "lora_b has dtype torch.float16 but lora_a has"),
    (dict(lora_a=torch.zeros(3, 4, 8, dtype=torch.int8)), "lora_a has dtype torch.int8"),
    (dict(indices=torch.zeros(5, dtype=torch.int64)), r"indices must have shape \(T,\) = \(6,\)"),
    (dict(indices=torch.zeros(6, 1, dtype=torch.int64)), "indices must have shape"),
    (dict(indices=torch.zeros(6)), "indices has dtype torch.float32; supported: int32, int64"),
    (dict(indices=torch.tensor([0, 1, 2, 3, -1, 0])), r"indices must lie in \[-1, 3\).*\[-1, 3\]"),
    (dict(indices=torch.tensor([0, -2, 2, 1, -1, 0])), r"indices must lie in \[-1, 3\).*\[-2, 2\]"),
    (dict(scaling=torch.ones(2)), r"scaling must be a floating tensor of shape \(S,\) = \(3,\)"),
    (dict(scaling=torch.ones(3, dtype=torch.int64)), "scaling must be a floating tensor"),
    (dict(scaling=2.0), "scaling must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
@pytest.mark.parametrize("change,match", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_input_names_the_argument(change, match, backend):
    with pytest.raises((ValueError, TypeError), match=match):
        sgmv(**_bad(**change), backend=backend)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (a tensor on another device)")
def test_tensors_on_another_device():
    with pytest.raises(ValueError, match="indices is on cpu but x is on cuda"):
        sgmv(**_bad(x=torch.zeros(6, 8, device="cuda")))


def test_plan_must_match_the_call():
    args = _bad()
    with pytest.raises(ValueError, match="plan was made for 6 tokens and 2 slots"):
        sgmv(**args, plan=sgmv_plan(args["indices"].clamp(max=1), 2))
    with pytest.raises(TypeError, match="plan must be an SgmvPlan"):
        sgmv(**args, plan="plan")
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, 2\)"):
        sgmv_plan(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="num_slots must be an int >= 0"):
        sgmv_plan(torch.tensor([0, 1]), -1)


# --------------------------------------------------------------------------------------------
# the C++ CPU kernel: every instruction set, dtype, odd sizes, layouts, threads

ISAS = ("scalar", "avx2", "avx512")
_DETECTED = _extension.build_info().get("detected_cpu_isa")
CPU_ISAS = [i for i in ISAS if _DETECTED in ISAS and ISAS.index(i) <= ISAS.index(_DETECTED)]
needs_cpu_kernel = pytest.mark.skipif(not CPU_KERNEL, reason=f"parallax._C not loaded: {_extension.load_error()}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=CPU_ISAS or ["none"])
def isa(request):
    """Each SIMD path of the C++ kernels this CPU has (restored after)."""
    if not CPU_KERNEL:
        pytest.skip(f"parallax._C not loaded: {_extension.load_error()}")
    previous = _extension.cpu_isa()
    _extension.set_cpu_isa(request.param)
    yield request.param
    _extension.set_cpu_isa(previous)


def _cpu(inputs, **kw):
    """The C++ kernel's result with lora_b passed in its fast layout (N contiguous)."""
    x, lora_a, lora_b, indices, scaling = inputs
    return sgmv(x, lora_a, lora_b.transpose(1, 2).contiguous().transpose(1, 2), indices, scaling, backend="cpu", **kw)


# (T, K, N, R, S): odd T, K and N past and below a vector (16 / 8 floats), ranks 1 to 16 (and
# not a multiple of the 4 ranks a block computes), 1 to 8 slots, one slot over many tiles of 16
CPU_CASES = [(1, 97, 123, 1, 1), (7, 123, 97, 8, 3), (97, 97, 123, 16, 8), (123, 123, 97, 8, 5),
             (123, 16, 256, 16, 1), (33, 5, 3, 3, 2), (64, 256, 768, 8, 8), (40, 48, 40, 7, 4)]


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_cpu_kernel_matches_definition(case, dtype, isa):
    t, k, n, r, s = case
    inputs = _inputs(t, k, n, r, s, dtype, seed=t * k + n * r + s, device="cpu")
    got = _check_against_definition(inputs, name=f"{isa} {case} {dtype}", backend="cpu")
    # lora_b's fast layout (N contiguous) and the contiguous one it is copied from: the same sums
    assert torch.equal(_cpu(inputs), got)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_every_token_base_or_adapter(dtype, isa):
    """All -1 (exact zeros, the output starts uninitialised), and every token through one adapter
    equal to that adapter's two matmuls."""
    base = _inputs(37, 97, 123, 8, 4, dtype, seed=21, indices=[-1] * 37, device="cpu")
    x = base[0].clone().fill_(float("nan"))  # base rows never read x
    got = sgmv(x, *base[1:], backend="cpu")
    assert torch.equal(got, torch.zeros_like(got))
    inputs = _inputs(37, 97, 123, 8, 4, dtype, seed=22, indices=[2] * 37, device="cpu")
    _check_against_definition(inputs, name=f"{isa} one adapter {dtype}", backend="cpu")


@needs_cpu_kernel
@pytest.mark.parametrize("run", [1, 15, 16, 17, 31, 32, 33])
def test_cpu_kernel_tile_boundaries(run, isa):
    """Slot 1's run of ``run`` tokens (tiles of 16, blocks of 4) among a few tokens of slot 0 and the base."""
    indices = torch.tensor([1] * run + [0, -1, 0, -1, 0])[torch.randperm(run + 5, generator=torch.Generator().manual_seed(run))]
    inputs = _inputs(len(indices), 45, 70, 5, 2, torch.float32, seed=run, indices=indices, device="cpu")
    _check_against_definition(inputs, name=f"{isa} run {run}", backend="cpu")


@needs_cpu_kernel
def test_cpu_kernel_layouts_give_the_same_sums():
    """Any strides: x a column slice of a wider tensor (rows strided) or transposed (columns
    strided), lora_a transposed, lora_b contiguous or N-contiguous, int32 indices: bit-equal results."""
    x, lora_a, lora_b, indices, scaling = _inputs(29, 97, 123, 8, 5, torch.float32, seed=23, device="cpu")
    want = _cpu((x, lora_a, lora_b, indices, scaling))
    wide_x = torch.cat([x, x.flip(1)], dim=1)[:, :97]
    x_t = x.T.contiguous().T
    a_t = lora_a.transpose(1, 2).contiguous().transpose(1, 2)
    assert x_t.stride(1) != 1 and wide_x.stride(0) == 194 and a_t.stride(2) != 1 and lora_b.stride(1) != 1
    for args in [(wide_x, lora_a, lora_b, indices, scaling), (x_t, a_t, lora_b, indices.int(), scaling),
                 (x, lora_a, lora_b, indices, scaling.double())]:
        assert torch.equal(sgmv(*args, backend="cpu"), want)


@needs_cpu_kernel
# (T, K, N, R, S): small calls run on one thread; past 2M multiply-adds the work is split over
# tiles and column chunks (few tiles: the columns are cut for the threads)
@pytest.mark.parametrize("case", [(5, 64, 1000, 8, 3), (123, 97, 123, 8, 2), (300, 256, 768, 8, 8),
                                  (5, 2048, 30000, 16, 3)], ids=str)
def test_cpu_kernel_threads_do_not_change_the_result(case):
    """Each output element is the same sum whatever the thread count and the split."""
    t, k, n, r, s = case
    inputs = _inputs(t, k, n, r, s, torch.float32, seed=t + n, device="cpu")
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(_cpu(inputs))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    _check_against_definition(inputs, name=str(case), backend="cpu")


@needs_cpu_kernel
def test_cpu_kernel_under_inference_mode_and_with_a_plan():
    """The engine's call: inference mode, a plan (checked, not needed on CPU)."""
    inputs = _inputs(23, 40, 36, 8, 3, torch.float32, seed=24, device="cpu")
    with torch.inference_mode():
        got = sgmv(*inputs, plan=sgmv_plan(inputs[3], 3))
    assert torch.equal(got, sgmv(*inputs, backend="cpu"))


OP_BAD = [
    (dict(lora_a=torch.zeros(3, 4, 9)), r"parallax::sgmv: lora_a must have shape \(S, R, K\) with R >= 1 and K=8"),
    (dict(lora_b=torch.zeros(3, 10, 5)), r"parallax::sgmv: lora_b must have shape \(S, N, R\) with S=3 and R=4"),
    (dict(lora_b=torch.zeros(3, 10, 4, dtype=torch.float16)), "parallax::sgmv: lora_b has dtype Half but lora_a has"),
    (dict(x=torch.zeros(6, 8, dtype=torch.float64)), "parallax::sgmv: x must be float32, bfloat16 or float16"),
    (dict(indices=torch.zeros(5, dtype=torch.int64)), r"parallax::sgmv: indices must have shape \(T,\) = \(6,\)"),
    (dict(indices=torch.zeros(6, dtype=torch.int16)), "parallax::sgmv: indices must be int32 or int64"),
    (dict(indices=torch.tensor([0, 1, 2, 3, -1, 0])), r"indices must lie in \[-1, 3\).*got values in \[-1, 3\]"),
    (dict(indices=torch.tensor([0, -2, 2, 1, -1, 0], dtype=torch.int32)), r"indices must lie in \[-1, 3\).*\[-2, 2\]"),
    (dict(scaling=torch.ones(2)), r"parallax::sgmv: scaling must be a floating tensor of shape \(S,\) = \(3,\)"),
]


@needs_cpu_kernel
@pytest.mark.parametrize("change,match", OP_BAD, ids=[str(i) for i in range(len(OP_BAD))])
def test_the_op_itself_checks_its_arguments(change, match):
    """torch.ops.parallax.sgmv called directly (no Python checks): ValueError naming the argument."""
    args = _bad(**change)
    with pytest.raises(ValueError, match=match):
        torch.ops.parallax.sgmv(args["x"], args["lora_a"], args["lora_b"], args["indices"], args["scaling"])


@needs_cpu_kernel
def test_the_op_schema_and_fake_impl():
    """torch.library's checks of the registration: schema, fake (meta) impl against the real one."""
    x, lora_a, lora_b, indices, scaling = _inputs(9, 16, 24, 4, 3, torch.bfloat16, adapter_dtype=torch.float32,
                                                  seed=25, device="cpu")
    torch.library.opcheck(torch.ops.parallax.sgmv.default, (x, lora_a, lora_b, indices, scaling),
                          test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------------------------
# sgmv_add_: the update added into y in place (what the engine's LoraLinear layers call)

Y_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _y(t, n, dtype, seed, device=DEVICE):
    return torch.randn(t, n, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def _check_add(inputs, y, *, name, **kw):
    """sgmv_add_ into a copy of y: in place, y + the definition's update rounded once to y's dtype
    (within twice PyTorch's error), the base tokens' rows bit-unchanged."""
    indices = inputs[3]
    got = y.clone()
    assert sgmv_add_(got, *inputs, **kw) is got
    exact = y.double().cpu() + definition(*inputs)
    pytorch = (y + sgmv_ref(*inputs)).to(y.dtype)
    assert_error_within_twice_pytorch(got, pytorch, exact, atol=max(ATOL[y.dtype], ATOL[inputs[1].dtype]), name=name)
    off = (indices < 0).cpu()
    assert torch.equal(got.cpu()[off], y.cpu()[off]), f"{name}: tokens without an adapter"
    return got


@pytest.mark.parametrize("y_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES[:5], ids=str)
def test_sgmv_add_matches_the_definition(case, y_dtype, kernel):
    t, k, n, r, s = case
    inputs = _inputs(t, k, n, r, s, torch.float32, seed=t * n + r)
    _check_add(inputs, _y(t, n, y_dtype, seed=t + 1), name=f"{case} y {y_dtype}", backend=kernel)


@needs_cpu_kernel
@pytest.mark.parametrize("y_dtype", Y_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CPU_CASES[:6], ids=str)
def test_cpu_kernel_adds_in_place_for_every_dtype_pair(case, dtype, y_dtype, isa):
    """Adapters in any dtype into y of any dtype (a bfloat16 base's output and its float32
    adapters, as PEFT keeps them), odd sizes, every instruction set."""
    t, k, n, r, s = case
    inputs = _inputs(t, k, n, r, s, dtype, seed=t + k * r + s, device="cpu")
    _check_add(inputs, _y(t, n, y_dtype, seed=k, device="cpu"), name=f"{isa} {case} {dtype} y {y_dtype}",
               backend="cpu")


@needs_cpu_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_add_is_the_sum_of_y_and_sgmv(threads):
    """float32: bit-equal to ``y + sgmv(...)`` (the same update, one rounding of the sum), on one
    thread and split over two (past 2M multiply-adds)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for case in [(64, 256, 768, 8, 8), (300, 256, 768, 8, 8)]:
            inputs = _inputs(*case, torch.float32, seed=case[0], device="cpu")
            y = _y(case[0], case[2], torch.float32, seed=3, device="cpu")
            assert torch.equal(sgmv_add_(y.clone(), *inputs, backend="cpu"), y + sgmv(*inputs, backend="cpu"))
    finally:
        torch.set_num_threads(before)


@needs_cpu_kernel
def test_cpu_kernel_add_into_strided_and_aliased_rows():
    """y a column slice of a wider tensor (rows strided: only its columns change), y with strided
    columns (through sgmv's result), and y that is x itself (K == N: x is read before y is written)."""
    inputs = _inputs(29, 40, 40, 8, 5, torch.float32, seed=26, device="cpu")
    y = _y(29, 40, torch.float32, seed=27, device="cpu")
    want = y + sgmv(*inputs, backend="cpu")
    wide = torch.cat([y, torch.full((29, 7), 5.0)], dim=1)
    sgmv_add_(wide[:, :40], *inputs, backend="cpu")
    assert torch.equal(wide[:, :40], want) and bool((wide[:, 40:] == 5.0).all())
    y_t = y.T.contiguous().T
    assert y_t.stride(1) != 1
    assert torch.equal(sgmv_add_(y_t, *inputs, backend="cpu"), want)
    x = inputs[0].clone()
    want_x = x + sgmv(x, *inputs[1:], backend="cpu")
    assert torch.equal(sgmv_add_(x, x, *inputs[1:], backend="cpu"), want_x)


Y_BAD = [
    (torch.zeros(6, 9), r"sgmv_add_: y must have shape \(T, N\) = \(6, 10\)"),
    (torch.zeros(6, 10, dtype=torch.float64), "sgmv_add_: y has dtype torch.float64"),
    ([[0.0] * 10] * 6, "sgmv_add_: y must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
@pytest.mark.parametrize("y,match", Y_BAD, ids=["shape", "dtype", "type"])
def test_sgmv_add_bad_y_names_it(y, match, backend):
    with pytest.raises((ValueError, TypeError), match=match):
        sgmv_add_(y, **_bad(), backend=backend)
    with pytest.raises(ValueError, match="indices must lie in"):  # the other arguments as sgmv checks them
        sgmv_add_(torch.zeros(6, 10), **_bad(indices=torch.tensor([0, 1, 2, 3, -1, 0])), backend=backend)


@needs_cpu_kernel
@pytest.mark.parametrize("y,match", [
    (torch.zeros(6, 9), r"parallax::sgmv_add_: y must have shape \(T, N\) = \(6, 10\)"),
    (torch.zeros(6, 10, dtype=torch.float64), "parallax::sgmv_add_: y must be float32, bfloat16 or float16"),
    (torch.zeros(10, 6).T, r"parallax::sgmv_add_: y's rows must be contiguous"),
], ids=["shape", "dtype", "strides"])
def test_the_add_op_itself_checks_y(y, match):
    args = _bad()
    with pytest.raises(ValueError, match=match):
        torch.ops.parallax.sgmv_add_(y, args["x"], args["lora_a"], args["lora_b"], args["indices"], args["scaling"])
    with pytest.raises(ValueError, match=r"parallax::sgmv_add_: lora_b must have shape"):
        torch.ops.parallax.sgmv_add_(torch.zeros(6, 10), args["x"], args["lora_a"], torch.zeros(3, 10, 5),
                                     args["indices"], args["scaling"])


@needs_cpu_kernel
def test_the_add_op_schema_and_fake_impl():
    x, lora_a, lora_b, indices, scaling = _inputs(9, 16, 24, 4, 3, torch.float32, seed=28, device="cpu")
    y = _y(9, 24, torch.bfloat16, seed=29, device="cpu")
    torch.library.opcheck(torch.ops.parallax.sgmv_add_.default, (y, x, lora_a, lora_b, indices, scaling),
                          test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------------------------
# GPU: compiled kernels at Llama sizes


@needs_cuda
# (T, K, N, R, S, adapter dtype): a decode batch of 8 adapters, a prefill chunk, fp32 adapters
@pytest.mark.parametrize("case", [(64, 4096, 4096, 16, 8, torch.bfloat16), (2048, 4096, 14336, 64, 3, torch.bfloat16),
                                  (333, 4096, 1027, 8, 9, torch.float32)], ids=str)
def test_llama_sizes_on_gpu(case):
    t, k, n, r, s, adapter_dtype = case
    inputs = _inputs(t, k, n, r, s, torch.bfloat16, adapter_dtype=adapter_dtype, seed=t + r)
    _check_against_definition(inputs, name=str(case))
