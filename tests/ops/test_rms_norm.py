"""RMSNorm (Triton forward and backward) against a float64 reference, and the reference against
Hugging Face's LlamaRMSNorm.

The kernel's error against float64, for the output and both gradients, may be at most twice the
error of the PyTorch reference run at the input precision (Hugging Face's own computation) plus
a small atol. On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here
when there is no GPU and it is not set already); on a GPU the same tests run compiled.
"""

from __future__ import annotations

import importlib
import os

import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from parallax import ops  # noqa: E402
from parallax.ops import rms_norm, rms_norm_ref  # noqa: E402
from tests.helpers import (CUDA, assert_close, assert_error_within_twice_pytorch,  # noqa: E402
                           interpreter_rounds_bf16_like_gpus, triton_interpreter_problem)

rn = importlib.import_module("parallax.ops.rms_norm")  # the module (the package exports the function)

DEVICE = "cuda" if CUDA else "cpu"
INTERPRETER_PROBLEM = None if CUDA else triton_interpreter_problem()
KERNEL = ops.backend("rms_norm", DEVICE) == "triton" and INTERPRETER_PROBLEM is None
needs_kernel = pytest.mark.skipif(not KERNEL, reason=INTERPRETER_PROBLEM or (
    "no GPU and TRITON_INTERPRET is not enabled: the Triton kernels cannot run here"))
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled kernels at Llama sizes)")

ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def _bf16_rounding(monkeypatch):
    if KERNEL and not CUDA:
        interpreter_rounds_bf16_like_gpus(monkeypatch)


def _inputs(shape, dtype, weight_dtype=None, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * 3
    weight = 1 + 0.5 * torch.randn(shape[-1], generator=gen)
    dy = torch.randn(*shape, generator=gen)
    out_dtype = torch.promote_types(dtype, weight_dtype or dtype)
    return x.to(device, dtype), weight.to(device, weight_dtype or dtype), dy.to(device, out_dtype)


def _run(fn, x, weight, dy, **kw):
    """Output, dx and dweight of ``fn`` on leaf copies of x and weight."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    y = fn(*leaves, **kw)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


def _against_float64(shape, dtype, weight_dtype=None, seed=0, eps=1e-6):
    x, weight, dy = _inputs(shape, dtype, weight_dtype, seed)
    got = _run(rms_norm, x, weight, dy, eps=eps)
    pytorch = _run(rms_norm_ref, x, weight, dy, eps=eps)
    # exact: float64 throughout, with the forward's rounding of the normalised value to x's dtype
    # left out (it is not part of the math; both runs above pay it)
    exact = _run(rms_norm_ref, x.double(), weight.double(), dy.double(), eps=eps)
    for name, g, p, e in zip(("y", "dx", "dweight"), got, pytorch, exact):
        assert_error_within_twice_pytorch(g, p, e, atol=ATOL[dtype], name=f"{shape} {dtype} {name}")


# --------------------------------------------------------------------------------------------
# against float64


SHAPES = [(1, 1025), (7, 123), (97, 7), (1025, 97), (123, 1), (2, 3, 5, 40)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(shape, dtype):
    _against_float64(shape, dtype, seed=sum(shape))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_weight_promotes_the_output(dtype):
    """A 16-bit x with an fp32 weight gives an fp32 output, as Hugging Face's weight * normed."""
    x, weight, _ = _inputs((5, 33), dtype, torch.float32)
    assert rms_norm(x, weight).dtype == torch.float32
    _against_float64((9, 33), dtype, torch.float32, seed=4)


@needs_kernel
@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    C=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    eps=st.sampled_from([1e-6, 1e-5, 0.1]),
)
def test_random_shapes(lead, C, dtype, eps):
    _against_float64((*lead, C), dtype, seed=C, eps=eps)


# --------------------------------------------------------------------------------------------
# semantics: layouts, frozen weight, determinism, empty


@needs_kernel
def test_qk_norm_on_a_slice_of_a_fused_projection():
    """Qwen3's QK-norm: q (B, T, H, D) cut from a fused QKV output, normalised per head."""
    B, T, H, H_kv, D = 2, 9, 4, 2, 24
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, H + 2 * H_kv, D, generator=gen).to(DEVICE)
    q = qkv[:, :, :H]
    weight = torch.randn(D, generator=gen).to(DEVICE)
    dy = torch.randn(B, T, H, D, generator=gen).to(DEVICE)
    assert not q.is_contiguous()
    got = _run(rms_norm, q, weight, dy)
    dense = _run(rms_norm, q.contiguous(), weight, dy)
    for name, a, b in zip(("y", "dx", "dweight"), got, dense):
        assert_close(a, b, atol=1e-6, rtol=1e-6, name=name)
    exact = _run(rms_norm_ref, q.double(), weight.double(), dy.double())
    for name, a, b in zip(("y", "dx", "dweight"), got, exact):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=name)


@needs_kernel
def test_frozen_weight_gives_the_same_dx():
    """A weight that needs no gradient (frozen, e.g. under LoRA) skips dw, not dx."""
    x, weight, dy = _inputs((13, 57), torch.float32, seed=5)
    leaf = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(rms_norm(leaf, weight), [leaf], dy)
    assert torch.equal(dx, _run(rms_norm, x, weight, dy)[1])


@needs_kernel
def test_backward_is_deterministic():
    x, weight, dy = _inputs((301, 40), torch.float16, seed=6)
    first, second = _run(rms_norm, x, weight, dy), _run(rms_norm, x, weight, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_kernel
def test_empty_rows():
    x, weight, dy = _inputs((0, 3, 16), torch.float32)
    y, dx, dweight = _run(rms_norm, x, weight, dy)
    assert y.shape == (0, 3, 16) and dx.shape == x.shape
    assert torch.equal(dweight, torch.zeros_like(weight))


# --------------------------------------------------------------------------------------------
# the reference is Hugging Face's LlamaRMSNorm


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=str)
def test_reference_is_hf_llama_rmsnorm(dtype, weight_dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, weight, dy = _inputs((4, 7, 96), dtype, weight_dtype, seed=7, device="cpu")
    hf = LlamaRMSNorm(96, eps=1e-5).to(weight_dtype)
    with torch.no_grad():
        hf.weight.copy_(weight)
    x_hf = x.clone().requires_grad_()
    y_hf = hf(x_hf)
    y_hf.backward(dy)
    y, dx, dweight = _run(rms_norm_ref, x, weight, dy, eps=1e-5)
    assert torch.equal(y, y_hf.detach()) and y.dtype == y_hf.dtype
    assert torch.equal(dx, x_hf.grad) and torch.equal(dweight, hf.weight.grad)


# --------------------------------------------------------------------------------------------
# errors, dispatch


def test_bad_inputs_name_the_argument():
    x, weight, _ = _inputs((3, 8), torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(8,\) .* got \(7,\)"):
        rms_norm(x, weight[:7])
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(8,\) .* got \(1, 8\)"):
        rms_norm(x, weight[None])
    with pytest.raises(ValueError, match="x has dtype torch.float64"):
        rms_norm(x.double(), weight)
    with pytest.raises(ValueError, match="weight has dtype torch.int64"):
        rms_norm(x, weight.long())
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        rms_norm(x, weight.to("meta"))
    with pytest.raises(ValueError, match="x must have at least one dim"):
        rms_norm(x[0, 0], weight[:1])
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1.0"):
        rms_norm(x, weight, eps=-1.0)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got NoneType"):
        rms_norm(x, None)
    with pytest.raises(ValueError, match="backend must be one of 'triton', 'reference' or None, got 'cuda'"):
        rms_norm(x, weight, backend="cuda")


@needs_kernel
def test_kernel_width_limit_is_a_clear_error():
    wide = torch.zeros(1, rn.MAX_KERNEL_COLS + 1, device=DEVICE)
    with pytest.raises(ValueError, match="x has C=65537 columns, more than the Triton kernel's 65536"):
        rms_norm(wide, torch.ones(wide.shape[-1], device=DEVICE), backend="triton")


def test_cpu_without_the_interpreter_runs_the_reference(monkeypatch):
    """What the models get on CPU: the plain PyTorch reference, bit for bit, gradients by autograd."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend("rms_norm", "cpu") == "reference"
    x, weight, dy = _inputs((6, 31), torch.float32, seed=8, device="cpu")
    for a, b in zip(_run(rms_norm, x, weight, dy), _run(rms_norm_ref, x, weight, dy)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="backend='triton' cannot run on cpu tensors here"):
        rms_norm(x, weight, backend="triton")
    if CUDA:
        assert ops.backend("rms_norm", "cuda") == "triton"


@needs_kernel
def test_backend_argument_forces_the_reference():
    x, weight, dy = _inputs((6, 31), torch.float32, seed=9)
    got = _run(rms_norm, x, weight, dy, backend="reference")
    for a, b in zip(got, _run(rms_norm_ref, x, weight, dy)):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# GPU: compiled kernels at Llama sizes


@needs_cuda
@pytest.mark.parametrize("shape", [(2, 2048, 4096), (4096, 8192), (2, 1024, 16, 128)], ids=str)
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_llama_sizes_bf16_on_gpu(shape, weight_dtype):
    _against_float64(shape, torch.bfloat16, weight_dtype, seed=shape[-1])
