"""The fused LoRA linear layer (Triton forward and input gradient) against a float64 reference.

The kernel's error against float64, for the output and every gradient (x, lora_x, lora_a,
lora_b, and weight and bias when they require grad), may be at most twice the error of
PyTorch's own computation at the input precision (``lora_linear_ref``, Hugging Face PEFT's
forward) plus a small atol. On CPU the kernel runs under Triton's interpreter
(TRITON_INTERPRET=1, set here when there is no GPU and it is not set already) with small
shapes, in fp32 and fp16; on a GPU the same tests run compiled, bf16 included.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from parallax import ops  # noqa: E402
from parallax.ops import lora_linear, lora_linear_ref  # noqa: E402
from tests.helpers import CUDA, assert_error_within_twice_pytorch, triton_interpreter_problem  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
INTERPRETER_PROBLEM = None if CUDA else triton_interpreter_problem()
KERNEL = ops.backend("lora_linear", DEVICE) == "triton" and INTERPRETER_PROBLEM is None
needs_kernel = pytest.mark.skipif(not KERNEL, reason=INTERPRETER_PROBLEM or (
    "no GPU and TRITON_INTERPRET is not enabled: the Triton kernels cannot run here"))
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled kernels at Llama sizes)")
# Triton's interpreter computes tl.dot on bf16 operands from their raw bits (see test_flash_attention)
needs_bf16_dot = pytest.mark.skipif(not CUDA, reason="Triton's interpreter returns garbage for tl.dot on bf16 "
                                                     "operands (bf16 is tested on GPU)")

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
SCALING = 2.0  # PEFT's lora_alpha / r for alpha = 2 r


def _inputs(lead, k, n, r, dtype, *, seed, bias=True, separate_lora_x=False, adapter_dtype=None,
            device=DEVICE):
    """x, weight, bias, lora_a, lora_b, lora_x and dout, fresh random; B non-zero (PEFT initialises
    it to zero, which would hide the low-rank term)."""
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rand(*shape, std=1.0, as_dtype=dtype):
        return (torch.randn(shape, generator=gen) * std).to(device, as_dtype)

    x = rand(*lead, k)
    weight, bias_t = rand(n, k, std=k ** -0.5), (rand(n) if bias else None)
    lora_a, lora_b = rand(r, k, std=k ** -0.5, as_dtype=adapter_dtype), rand(n, r, std=r ** -0.5,
                                                                              as_dtype=adapter_dtype)
    lora_x = rand(*lead, k) if separate_lora_x else None
    dout = rand(*lead, n)
    return dict(x=x, weight=weight, bias=bias_t, lora_a=lora_a, lora_b=lora_b, lora_x=lora_x), dout


def _run(fn, tensors, dout, frozen=()):
    """Output and the gradients of every tensor argument not in ``frozen`` (name -> tensor)."""
    leaves = {name: t.detach().clone().requires_grad_(name not in frozen) for name, t in tensors.items()
              if t is not None}
    out = fn(leaves["x"], leaves["weight"], leaves.get("bias"), leaves["lora_a"], leaves["lora_b"], SCALING,
             leaves.get("lora_x"))
    trained = {name: t for name, t in leaves.items() if t.requires_grad}
    grads = torch.autograd.grad(out, list(trained.values()), dout)
    return {"out": out.detach(), **{f"d{name}": g for name, g in zip(trained, grads)}}


def _double(tensors):
    return {name: None if t is None else t.double() for name, t in tensors.items()}


def _against_float64(lead, k, n, r, dtype, *, seed, frozen=(), **kw):
    tensors, dout = _inputs(lead, k, n, r, dtype, seed=seed, **kw)
    got = _run(lora_linear, tensors, dout, frozen)
    pytorch = _run(lora_linear_ref, tensors, dout, frozen)
    exact = _run(lora_linear_ref, _double(tensors), dout.double(), frozen)
    assert got.keys() == exact.keys()
    for name in exact:
        assert_error_within_twice_pytorch(got[name], pytorch[name], exact[name], atol=ATOL[dtype],
                                          name=f"{lead} K={k} N={n} r={r} {dtype} {kw} {name}")
    return got


# --------------------------------------------------------------------------------------------
# against float64

# (leading dims of x, K, N, r, bias, separate lora_x)
CASES = [((1,), 33, 65, 1, True, False), ((7,), 65, 33, 8, False, True), ((97,), 33, 65, 16, True, True),
         ((2, 5), 17, 9, 8, True, False), ((3, 1, 7), 40, 24, 16, False, False), ((97,), 65, 33, 8, False, False),
         ((0,), 33, 65, 8, True, True),
         ((600,), 16, 150, 4, True, False)]  # 10 x 3 tiles: two groups of row tiles, the last one partial


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_reference(case, dtype):
    lead, k, n, r, bias, separate = case
    _against_float64(lead, k, n, r, dtype, seed=sum(lead) + k + n + r, bias=bias, separate_lora_x=separate)


@needs_bf16_dot
@pytest.mark.parametrize("case", CASES, ids=str)
def test_bf16_matches_float64_reference(case):
    lead, k, n, r, bias, separate = case
    _against_float64(lead, k, n, r, torch.bfloat16, seed=k * n + r, bias=bias, separate_lora_x=separate)


@needs_kernel
@settings(max_examples=6, deadline=None, derandomize=True)
@given(m=st.integers(0, 40), k=st.integers(1, 40), n=st.integers(1, 40), r=st.integers(1, 20),
       bias=st.booleans(), separate=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_random_shapes(m, k, n, r, bias, separate, dtype):
    _against_float64((m,), k, n, r, dtype, seed=m + k + n + r, bias=bias, separate_lora_x=separate)


# --------------------------------------------------------------------------------------------
# semantics: what PEFT trains, dtypes, layouts


@needs_kernel
@pytest.mark.parametrize("separate", [False, True], ids=["lora_x=x", "dropout"])
def test_frozen_base_has_no_gradient(separate):
    """PEFT's case: weight and bias frozen; only x and the adapters get gradients, still right."""
    got = _against_float64((7,), 33, 65, 8, torch.float32, seed=5, frozen=("weight", "bias"),
                           separate_lora_x=separate)
    assert "dweight" not in got and "dbias" not in got


@needs_kernel
@pytest.mark.parametrize("separate", [False, True], ids=["lora_x=x", "dropout"])
def test_frozen_base_keeps_only_the_activations_its_gradients_read(separate):
    """With a frozen base, x is kept for the backward only when the LoRA path reads it (A's
    gradient): with dropout, lora_x alone (PEFT keeps no more); the rank-r u, not (M, N) values."""
    tensors, _ = _inputs((7,), 33, 65, 8, torch.float32, seed=11, separate_lora_x=separate)
    leaves = {name: t.detach().clone().requires_grad_(name not in ("weight", "bias"))
              for name, t in tensors.items() if t is not None}
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        lora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], SCALING,
                    leaves.get("lora_x"))
    kept_rows = [t for t in kept if t.shape[0] == 7]  # activations; weights have other first dims
    assert sorted(tuple(t.shape) for t in kept_rows) == [(7, 8), (7, 33)]  # u and one input
    read = leaves["lora_x"] if separate else leaves["x"]
    assert [t.data_ptr() for t in kept_rows if t.shape == (7, 33)] == [read.data_ptr()]


@needs_kernel
def test_input_without_gradient():
    """The first layer's input (a frozen embedding's output) needs no gradient: only the adapters'."""
    got = _against_float64((7,), 33, 65, 8, torch.float32, seed=6, frozen=("x", "weight", "bias"))
    assert set(got) == {"out", "dlora_a", "dlora_b"}


@needs_kernel
@pytest.mark.parametrize("separate", [False, True], ids=["lora_x=x", "dropout"])
def test_fp32_adapters_on_a_16bit_base(separate):
    """PEFT keeps a 16-bit model's adapters in fp32 and runs the LoRA path in fp32; the result is
    in the base dtype, the adapters' gradients in fp32."""
    got = _against_float64((2, 9), 33, 65, 16, torch.float16, seed=7, adapter_dtype=torch.float32,
                           separate_lora_x=separate)
    assert got["out"].dtype == torch.float16 and got["dx"].dtype == torch.float16
    assert got["dlora_a"].dtype == torch.float32 and got["dlora_b"].dtype == torch.float32


@needs_kernel
def test_strided_inputs():
    """Transposed weights and adapters and a non-contiguous x are read through their strides."""
    tensors, dout = _inputs((5, 7), 33, 65, 8, torch.float32, seed=8)
    strided = {"x": tensors["x"].transpose(0, 1).contiguous().transpose(0, 1),
               "weight": tensors["weight"].t().contiguous().t(), "bias": tensors["bias"],
               "lora_a": tensors["lora_a"].t().contiguous().t(), "lora_b": tensors["lora_b"].t().contiguous().t(),
               "lora_x": None}
    assert not (strided["x"].is_contiguous() or strided["weight"].is_contiguous())
    got, dense = _run(lora_linear, strided, dout), _run(lora_linear, tensors, dout)
    for name in dense:
        torch.testing.assert_close(got[name], dense[name], rtol=1e-5, atol=1e-5, msg=name)


@needs_kernel
def test_zero_b_is_the_base_layer():
    """PEFT's initialisation (B = 0): the output is the base layer's, B still gets a gradient."""
    tensors, dout = _inputs((7,), 33, 65, 8, torch.float32, seed=9)
    tensors["lora_b"] = torch.zeros_like(tensors["lora_b"])
    got = _run(lora_linear, tensors, dout)
    torch.testing.assert_close(got["out"], F.linear(tensors["x"], tensors["weight"], tensors["bias"]))
    assert got["dlora_b"].abs().max() > 0 and torch.equal(got["dlora_a"], torch.zeros_like(got["dlora_a"]))


# --------------------------------------------------------------------------------------------
# errors, dispatch


def test_bad_inputs_name_the_argument():
    t, _ = _inputs((4,), 6, 5, 2, torch.float32, seed=0, device="cpu")
    x, w, b, a, bb = t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"]
    with pytest.raises(ValueError, match=r"weight must have shape \(N, K\) with K=6 \(x's last dim\), got \(5, 4\)"):
        lora_linear(x, w[:, :4], b, a, bb, 1.0)
    with pytest.raises(ValueError, match=r"bias must have shape \(N,\) = \(5,\), got \(4,\)"):
        lora_linear(x, w, b[:4], a, bb, 1.0)
    with pytest.raises(ValueError, match=r"lora_a must have shape \(r, K\) with r >= 1 and K=6, got \(2, 3\)"):
        lora_linear(x, w, b, a[:, :3], bb, 1.0)
    with pytest.raises(ValueError, match=r"lora_a must have shape \(r, K\) with r >= 1 and K=6, got \(0, 6\)"):
        lora_linear(x, w, b, a[:0], bb[:, :0], 1.0)
    with pytest.raises(ValueError, match=r"lora_b must have shape \(N, r\) = \(5, 2\), got \(5, 3\)"):
        lora_linear(x, w, b, a, torch.zeros(5, 3), 1.0)
    with pytest.raises(ValueError, match=r"lora_x has shape \(3, 6\) but x has \(4, 6\)"):
        lora_linear(x, w, b, a, bb, 1.0, x[:3])
    with pytest.raises(ValueError, match="weight has dtype torch.float16 but x has torch.float32"):
        lora_linear(x, w.half(), b, a, bb, 1.0)
    with pytest.raises(ValueError, match=r"lora_a has dtype torch.float16; it must be x's dtype \(torch.bfloat16\)"):
        lora_linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), a.half(), bb.half(), 1.0)
    with pytest.raises(ValueError, match="lora_b has dtype torch.float16 but lora_a has torch.float32"):
        lora_linear(x, w, b, a, bb.half(), 1.0)
    with pytest.raises(ValueError, match="x has dtype torch.float64"):
        lora_linear(x.double(), w.double(), b.double(), a.double(), bb.double(), 1.0)
    with pytest.raises(ValueError, match="lora_b is on meta but x is on cpu"):
        lora_linear(x, w, b, a, bb.to("meta"), 1.0)
    with pytest.raises(TypeError, match="lora_a must be a torch.Tensor, got list"):
        lora_linear(x, w, b, [1.0], bb, 1.0)
    with pytest.raises(ValueError, match="scaling must be a finite Python number, got nan"):
        lora_linear(x, w, b, a, bb, float("nan"))
    with pytest.raises(ValueError, match="scaling must be a finite Python number, got tensor"):
        lora_linear(x, w, b, a, bb, torch.tensor(1.0))
    with pytest.raises(ValueError, match="backend must be one of 'triton', 'reference' or None, got 'Triton'"):
        lora_linear(x, w, b, a, bb, 1.0, backend="Triton")


def test_cpu_without_the_interpreter_runs_peft_forward(monkeypatch):
    """What models get on CPU: the plain PyTorch reference, bit for bit PEFT's
    ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``, gradients by autograd."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend("lora_linear", "cpu") == "reference"
    tensors, dout = _inputs((3, 7), 33, 65, 8, torch.float32, seed=10, separate_lora_x=True, device="cpu")

    def peft(x, weight, bias, lora_a, lora_b, scaling, lora_x):
        return F.linear(x, weight, bias) + F.linear(F.linear(lora_x, lora_a), lora_b) * scaling

    got, expected = _run(lora_linear, tensors, dout), _run(peft, tensors, dout)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    with pytest.raises(ValueError, match="backend='triton' cannot run on cpu tensors here"):
        lora_linear(*(tensors[k] for k in ("x", "weight", "bias", "lora_a", "lora_b")), 1.0, backend="triton")
    if CUDA:
        assert ops.backend("lora_linear", "cuda") == "triton"


# --------------------------------------------------------------------------------------------
# GPU: compiled kernels at Llama sizes


@needs_cuda
# (leading dims of x, K, N, r, adapter dtype, separate lora_x): a frozen bf16 base, as PEFT trains
@pytest.mark.parametrize("case", [((2, 1024), 4096, 4096, 16, torch.bfloat16, False),
                                  ((4096,), 4096, 14336, 64, torch.float32, False),
                                  ((3, 333), 4096, 1027, 8, torch.bfloat16, True)], ids=str)
def test_llama_sizes_bf16_on_gpu(case):
    lead, k, n, r, adapter_dtype, separate = case
    _against_float64(lead, k, n, r, torch.bfloat16, seed=k + n + r, frozen=("weight", "bias"),
                     adapter_dtype=adapter_dtype, separate_lora_x=separate)
