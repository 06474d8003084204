"""SwiGLU, silu(gate) * up (Triton forward and backward), against a float64 reference.

The kernel's error against float64, for the output and both gradients, may be at most twice the
error of PyTorch's own ``F.silu(gate) * up`` at the input precision plus a small atol. On CPU the
kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here when there is no GPU and it
is not set already); on a GPU the same tests run compiled.
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
from parallax.ops import swiglu, swiglu_ref  # noqa: E402
from tests.helpers import (CUDA, assert_error_within_twice_pytorch,  # noqa: E402
                           interpreter_rounds_bf16_like_gpus, triton_interpreter_problem)

DEVICE = "cuda" if CUDA else "cpu"
INTERPRETER_PROBLEM = None if CUDA else triton_interpreter_problem()
KERNEL = ops.backend("swiglu", DEVICE) == "triton" and INTERPRETER_PROBLEM is None
needs_kernel = pytest.mark.skipif(not KERNEL, reason=INTERPRETER_PROBLEM or (
    "no GPU and TRITON_INTERPRET is not enabled: the Triton kernels cannot run here"))
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled kernels at Llama sizes)")

ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
NAMES = ("out", "dgate", "dup")


@pytest.fixture(autouse=True)
def _bf16_rounding(monkeypatch):
    if KERNEL and not CUDA:
        interpreter_rounds_bf16_like_gpus(monkeypatch)


def _inputs(shape, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    gate, up, dout = (torch.randn(tuple(shape), generator=gen) * 3 for _ in range(3))
    return gate.to(device, dtype), up.to(device, dtype), dout.to(device, dtype)


def _run(fn, gate, up, dout, **kw):
    """Output, dgate and dup of ``fn`` on leaf copies of gate and up."""
    leaves = [t.detach().clone().requires_grad_() for t in (gate, up)]
    out = fn(*leaves, **kw)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def _in_dtype(gate, up):
    """PyTorch's own SwiGLU at the input precision (what a Hugging Face MLP computes)."""
    return F.silu(gate) * up


def _against_float64(shape, dtype, seed=0):
    gate, up, dout = _inputs(shape, dtype, seed)
    got = _run(swiglu, gate, up, dout)
    pytorch = _run(_in_dtype, gate, up, dout)
    exact = _run(swiglu_ref, gate.double(), up.double(), dout.double())
    for name, g, p, e in zip(NAMES, got, pytorch, exact):
        assert_error_within_twice_pytorch(g, p, e, atol=ATOL[dtype], name=f"{shape} {dtype} {name}")


# --------------------------------------------------------------------------------------------
# against float64


SHAPES = [(), (1,), (7,), (97, 123), (3, 1025), (2, 5, 7), (1025, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(shape, dtype):
    _against_float64(shape, dtype, seed=sum(shape) + len(shape))


@needs_kernel
@settings(max_examples=8, deadline=None, derandomize=True)
@given(shape=st.lists(st.integers(0, 40), min_size=1, max_size=4), dtype=st.sampled_from(DTYPES))
def test_random_shapes(shape, dtype):
    _against_float64(tuple(shape), dtype, seed=sum(shape))


# --------------------------------------------------------------------------------------------
# semantics: layouts


@needs_kernel
def test_halves_of_a_fused_gate_up_projection():
    """gate and up as the two halves of one (tokens, 2 I) projection: read through row strides."""
    gen = torch.Generator().manual_seed(1)
    fused = torch.randn(3, 9, 2 * 45, generator=gen).to(DEVICE)
    gate, up = fused[..., :45], fused[..., 45:]
    dout = torch.randn(45, 9, 3, generator=gen).to(DEVICE).transpose(0, 2)  # a transposed gradient too
    assert not (gate.is_contiguous() or up.is_contiguous() or dout.is_contiguous())
    got = _run(swiglu, gate, up, dout)
    dense = _run(swiglu, gate.contiguous(), up.contiguous(), dout.contiguous())
    for name, a, b in zip(NAMES, got, dense):
        assert torch.equal(a, b), name
        assert a.is_contiguous() and a.shape == gate.shape, name


@needs_kernel
def test_transposed_inputs():
    gate, up, dout = _inputs((13, 21), torch.float16, seed=2)
    got = _run(swiglu, gate.t(), up.t(), dout.t())
    dense = _run(swiglu, gate.t().contiguous(), up.t().contiguous(), dout.t().contiguous())
    for name, a, b in zip(NAMES, got, dense):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------
# errors, dispatch


def test_bad_inputs_name_the_argument():
    gate, up, _ = _inputs((4, 6), torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"up has shape \(4, 5\) but gate has \(4, 6\)"):
        swiglu(gate, up[:, :5])
    with pytest.raises(ValueError, match="up has dtype torch.bfloat16 but gate has torch.float32"):
        swiglu(gate, up.bfloat16())
    with pytest.raises(ValueError, match="gate has dtype torch.int32"):
        swiglu(gate.int(), up.int())
    with pytest.raises(ValueError, match="up is on meta but gate is on cpu"):
        swiglu(gate, up.to("meta"))
    with pytest.raises(TypeError, match="up must be a torch.Tensor, got list"):
        swiglu(gate, [1.0])
    with pytest.raises(ValueError, match="backend must be one of 'triton', 'reference' or None, got 'Triton'"):
        swiglu(gate, up, backend="Triton")


def test_cpu_without_the_interpreter_runs_the_reference(monkeypatch):
    """What the models get on CPU: the plain PyTorch reference, bit for bit, gradients by autograd;
    in fp32 that is Hugging Face's ``act_fn(gate) * up``."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend("swiglu", "cpu") == "reference"
    gate, up, dout = _inputs((6, 31), torch.float32, seed=3, device="cpu")
    for a, b in zip(_run(swiglu, gate, up, dout), _run(_in_dtype, gate, up, dout)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="backend='triton' cannot run on cpu tensors here"):
        swiglu(gate, up, backend="triton")
    if CUDA:
        assert ops.backend("swiglu", "cuda") == "triton"


# --------------------------------------------------------------------------------------------
# GPU: compiled kernels at Llama sizes


@needs_cuda
@pytest.mark.parametrize("shape", [(2, 2048, 14336), (4096, 8192), (3, 1000, 4097)], ids=str)
def test_llama_sizes_bf16_on_gpu(shape):
    _against_float64(shape, torch.bfloat16, seed=shape[-1])
