"""Weight-only quantized linear layers (int8 per channel, packed int4 group-wise): the Triton
kernels against their dequantize-then-``F.linear`` references.

Fresh random codes, scales, zero points, x, bias and output gradients per case; the kernel's
error against float64 (the output and the gradients of x and bias) may be at most twice the
error of the PyTorch reference at the input precision plus a small atol. On CPU the kernels run
under Triton's interpreter (TRITON_INTERPRET=1, set here when there is no GPU) with small odd
shapes in fp32 and fp16, covering split-K (decode-sized M), one-group tiles and tiles that cross
groups; bf16 (whose tl.dot the interpreter gets wrong) and 4096-wide weights run on a GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from parallax import ops  # noqa: E402
from parallax.ops import int4_linear, int4_linear_ref, int8_linear, int8_linear_ref, quant_linear  # noqa: E402
from parallax.ops.quant_linear import pack_int4  # noqa: E402
from tests.helpers import CUDA, assert_error_within_twice_pytorch, triton_interpreter_problem  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
INTERPRETER_PROBLEM = None if CUDA else triton_interpreter_problem()
KERNEL = ops.backend("int8_linear", DEVICE) == "triton" and INTERPRETER_PROBLEM is None
needs_kernel = pytest.mark.skipif(not KERNEL, reason=INTERPRETER_PROBLEM or (
    "no GPU and TRITON_INTERPRET is not enabled: the Triton kernels cannot run here"))
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled kernels at Llama sizes)")
needs_bf16_dot = pytest.mark.skipif(not CUDA, reason="Triton's interpreter returns garbage for tl.dot on bf16 "
                                                     "operands (bf16 is tested on GPU)")

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _weights(bits: int, n: int, k: int, group_size: int | None, gen: torch.Generator, device=DEVICE) -> dict:
    """Random stored weights whose dequantized entries have a std near k ** -0.5."""
    if bits == 8:
        codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        scales = (torch.rand(n, generator=gen) + 0.5) * (k ** -0.5 / 73)
        return dict(qweight=codes.to(device), scales=scales.to(device))
    groups = k // group_size
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, groups, generator=gen) + 0.5) * (k ** -0.5 / 4.6)
    zeros = torch.rand(n, groups, generator=gen) * 15
    return dict(qweight=pack_int4(codes).to(device), scales=scales.to(device), zeros=zeros.to(device),
                group_size=group_size)


def _inputs(bits, lead, k, n, dtype, *, group_size=None, bias=True, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    weights = _weights(bits, n, k, group_size, gen, device)
    x = torch.randn(*lead, k, generator=gen).to(device, dtype)
    bias_t = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    dout = torch.randn(*lead, n, generator=gen).to(device, dtype)
    return x, bias_t, weights, dout


def _call(fn, x, bias, weights):
    if "zeros" in weights:
        return fn(x, weights["qweight"], weights["scales"], weights["zeros"], weights["group_size"], bias)
    return fn(x, weights["qweight"], weights["scales"], bias)


def _run(fn, x, bias, weights, dout):
    """The output and the gradients of x and bias."""
    leaves = [x.detach().clone().requires_grad_()] + ([] if bias is None else [bias.detach().clone().requires_grad_()])
    out = _call(fn, leaves[0], leaves[1] if bias is not None else None, weights)
    grads = torch.autograd.grad(out, leaves, dout)
    return {"out": out.detach(), "dx": grads[0], **({"dbias": grads[1]} if bias is not None else {})}


def _against_float64(bits, lead, k, n, dtype, *, group_size=None, bias=True, seed=0):
    x, bias_t, weights, dout = _inputs(bits, lead, k, n, dtype, group_size=group_size, bias=bias, seed=seed)
    fn, ref = (int8_linear, int8_linear_ref) if bits == 8 else (int4_linear, int4_linear_ref)
    got = _run(fn, x, bias_t, weights, dout)
    pytorch = _run(ref, x, bias_t, weights, dout)
    exact = _run(ref, x.double(), None if bias_t is None else bias_t.double(), weights, dout.double())
    assert got.keys() == exact.keys()
    for name in exact:
        assert_error_within_twice_pytorch(got[name], pytorch[name], exact[name], atol=ATOL[dtype],
                                          name=f"int{bits} {lead} K={k} N={n} g={group_size} {dtype} {name}")


# --------------------------------------------------------------------------------------------
# against float64

# (leading dims of x, K, N, bias): M = 1 and 7 take split-K, 97 not; K odd for int8
INT8_CASES = [((1,), 65, 33, True), ((7,), 33, 97, False), ((97,), 40, 7, True), ((2, 5), 129, 9, True),
              ((0,), 16, 5, True)]
# (leading dims of x, K, N, group size, bias): 32/64/128 (one group per K tile, split-K over
# groups), 6, 2, 48 and 16 (32-wide tiles that cross groups), a single group
INT4_CASES = [((1,), 256, 33, 128, True), ((7,), 128, 97, 32, False), ((97,), 64, 7, 64, True),
              ((3, 1), 96, 17, 6, True), ((5,), 10, 9, 2, False), ((1,), 48, 5, 48, True), ((2,), 80, 13, 16, True)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", INT8_CASES, ids=str)
def test_int8_matches_float64_reference(case, dtype):
    lead, k, n, bias = case
    _against_float64(8, lead, k, n, dtype, bias=bias, seed=sum(lead) + k + n)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", INT4_CASES, ids=str)
def test_int4_matches_float64_reference(case, dtype):
    lead, k, n, group_size, bias = case
    _against_float64(4, lead, k, n, dtype, group_size=group_size, bias=bias, seed=sum(lead) + k + n)


@needs_bf16_dot
@pytest.mark.parametrize("case", INT8_CASES, ids=str)
def test_int8_bf16_matches_float64_reference(case):
    lead, k, n, bias = case
    _against_float64(8, lead, k, n, torch.bfloat16, bias=bias, seed=k * n)


@needs_bf16_dot
@pytest.mark.parametrize("case", INT4_CASES, ids=str)
def test_int4_bf16_matches_float64_reference(case):
    lead, k, n, group_size, bias = case
    _against_float64(4, lead, k, n, torch.bfloat16, group_size=group_size, bias=bias, seed=k * n)


@needs_kernel
def test_split_k_and_single_pass_configurations_are_both_taken():
    """The cases above cover both launch shapes: decode-sized M splits K, a large M does not."""
    decode = quant_linear._launch_config(1, 33, 256, 128, torch.float32, torch.device(DEVICE))
    prefill = quant_linear._launch_config(97, 7, 64, 64, torch.float32, torch.device(DEVICE))
    assert decode["split"] > 1 and decode["GROUP_ALIGNED"]
    assert prefill["split"] == 1


@needs_kernel
def test_strided_input_and_weights_without_gradients():
    """x as a strided view; the stored weight and scales get no gradient, x and bias do."""
    x_wide, bias, weights, dout = _inputs(4, (6,), 128, 11, torch.float32, group_size=32, seed=3)
    x = torch.stack([x_wide, -x_wide], dim=-1)[..., 0].requires_grad_()  # strides (2 K, 2)
    assert x.stride() == (256, 2)
    scales = weights["scales"].clone().requires_grad_()
    out = int4_linear(x, weights["qweight"], scales, weights["zeros"], 32, bias)
    torch.testing.assert_close(out, int4_linear_ref(x_wide, weights["qweight"], weights["scales"], weights["zeros"],
                                                    32, bias), rtol=1e-5, atol=1e-5)
    out.backward(dout)
    assert x.grad is not None and scales.grad is None


# --------------------------------------------------------------------------------------------
# errors, dispatch


def test_bad_inputs_name_the_argument():
    x, bias, w8, _ = _inputs(8, (4,), 6, 5, torch.float32, device="cpu")
    q8, s8 = w8["qweight"], w8["scales"]
    with pytest.raises(ValueError, match=r"qweight must be an int8 \(N, K\) tensor with K=6 \(x's last dim\), "
                                         r"got torch.int8 \(5, 4\)"):
        int8_linear(x, q8[:, :4], s8, bias)
    with pytest.raises(ValueError, match=r"qweight must be an int8 \(N, K\) tensor .* got torch.uint8"):
        int8_linear(x, q8.to(torch.uint8), s8, bias)
    with pytest.raises(ValueError, match=r"scales must have shape \(N,\) = \(5,\), got \(4,\)"):
        int8_linear(x, q8, s8[:4], bias)
    with pytest.raises(ValueError, match=r"bias must have shape \(N,\) = \(5,\), got \(3,\)"):
        int8_linear(x, q8, s8, bias[:3])
    with pytest.raises(ValueError, match="bias has dtype torch.float16 but x has torch.float32"):
        int8_linear(x, q8, s8, bias.half())
    with pytest.raises(ValueError, match="x has dtype torch.float64; supported: float16, bfloat16, float32"):
        int8_linear(x.double(), q8, s8)
    with pytest.raises(ValueError, match="scales is on meta but x is on cpu"):
        int8_linear(x, q8, s8.to("meta"))
    with pytest.raises(TypeError, match="qweight must be a torch.Tensor, got list"):
        int8_linear(x, [1], s8)

    x, bias, w4, _ = _inputs(4, (4,), 8, 5, torch.float32, group_size=4, device="cpu")
    q4, s4, z4 = w4["qweight"], w4["scales"], w4["zeros"]
    with pytest.raises(ValueError, match=r"group_size must be a positive int dividing K=8 \(e.g. 32, 64, 128\), got 3"):
        int4_linear(x, q4, s4, z4, 3, bias)
    with pytest.raises(ValueError, match=r"group_size must be a positive int dividing K=8 .* got 0"):
        int4_linear(x, q4, s4, z4, 0, bias)
    with pytest.raises(ValueError, match="x's last dim K=7 must be even"):
        int4_linear(x[:, :7], q4, s4, z4, 7, bias)
    with pytest.raises(ValueError, match=r"qweight must be a uint8 \(N, K // 2\) tensor with K=8 \(x's last dim\), "
                                         r"got torch.uint8 \(5, 8\)"):
        int4_linear(x, torch.zeros(5, 8, dtype=torch.uint8), s4, z4, 4, bias)
    with pytest.raises(ValueError, match=r"scales must be a float \(N, K // group_size\) = \(5, 2\) tensor, "
                                         r"got torch.float32 \(5, 1\)"):
        int4_linear(x, q4, s4[:, :1], z4, 4, bias)
    with pytest.raises(ValueError, match=r"zeros must be a float \(N, K // group_size\) = \(5, 4\) tensor, "
                                         r"got torch.float32 \(5, 2\)"):
        int4_linear(x, q4, s4.repeat(1, 2), z4, 2, bias)
    with pytest.raises(ValueError, match="backend must be one of 'triton', 'reference' or None, got 'Triton'"):
        int4_linear(x, q4, s4, z4, 4, bias, backend="Triton")


def test_cpu_without_the_interpreter_runs_the_reference(monkeypatch):
    """What models get on CPU: dequantize-then-F.linear bit for bit, gradients by autograd."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend("int8_linear", "cpu") == "reference" and ops.backend("int4_linear", "cpu") == "reference"
    for bits, group_size in ((8, None), (4, 16)):
        x, bias, weights, dout = _inputs(bits, (3, 7), 32, 9, torch.float32, group_size=group_size, seed=bits,
                                         device="cpu")
        fn, ref = (int8_linear, int8_linear_ref) if bits == 8 else (int4_linear, int4_linear_ref)
        got, expected = _run(fn, x, bias, weights, dout), _run(ref, x, bias, weights, dout)
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
        with pytest.raises(ValueError, match="backend='triton' cannot run on cpu tensors here"):
            _call(lambda *a: fn(*a, backend="triton"), x, bias, weights)
    if CUDA:
        assert ops.backend("int4_linear", "cuda") == "triton"


# --------------------------------------------------------------------------------------------
# GPU: compiled kernels at Llama sizes


@needs_cuda
# (leading dims of x, K, N, group size or None for int8, dtype): decode batches 1 and 16, a prefill
@pytest.mark.parametrize("case", [((1,), 4096, 4096, None, torch.bfloat16), ((16,), 4096, 4096, None, torch.float16),
                                  ((3, 333), 4096, 1027, None, torch.bfloat16),
                                  ((1,), 4096, 4096, 128, torch.bfloat16), ((16,), 4096, 14336, 64, torch.bfloat16),
                                  ((2, 500), 4096, 4096, 32, torch.float16), ((7,), 4100, 300, 20, torch.bfloat16)],
                         ids=str)
def test_llama_sizes_on_gpu(case):
    lead, k, n, group_size, dtype = case
    _against_float64(8 if group_size is None else 4, lead, k, n, dtype, group_size=group_size, seed=k + n)
