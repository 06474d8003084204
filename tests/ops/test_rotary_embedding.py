"""Rotary embeddings (one Triton launch for q and k, forward and backward) against a float64
reference, and the reference against Hugging Face's ``apply_rotary_pos_emb``.

The kernel's error against float64, for both outputs and both gradients, may be at most twice the
error of the PyTorch reference at the input precision plus a small atol. On CPU the kernel runs
under Triton's interpreter (TRITON_INTERPRET=1, set here when there is no GPU and it is not set
already); on a GPU the same tests run compiled.
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
from parallax.ops import rotary_embedding, rotary_embedding_ref  # noqa: E402
from tests.helpers import (CUDA, assert_error_within_twice_pytorch,  # noqa: E402
                           interpreter_rounds_bf16_like_gpus, triton_interpreter_problem)

DEVICE = "cuda" if CUDA else "cpu"
INTERPRETER_PROBLEM = None if CUDA else triton_interpreter_problem()
KERNEL = ops.backend("rotary_embedding", DEVICE) == "triton" and INTERPRETER_PROBLEM is None
needs_kernel = pytest.mark.skipif(not KERNEL, reason=INTERPRETER_PROBLEM or (
    "no GPU and TRITON_INTERPRET is not enabled: the Triton kernels cannot run here"))
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled kernels at Llama sizes)")

ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
NAMES = ("q_out", "k_out", "dq", "dk")


@pytest.fixture(autouse=True)
def _bf16_rounding(monkeypatch):
    if KERNEL and not CUDA:
        interpreter_rounds_bf16_like_gpus(monkeypatch)


def _tables(batch, T, D, theta=10000.0, device=DEVICE):
    """cos, sin (batch, T, D/2) float32 of RoPE angles at positions 3..3+T (as Llama computes them)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    angles = (torch.arange(T, dtype=torch.float32) + 3)[:, None] * inv_freq  # (T, D/2)
    angles = angles.expand(batch, -1, -1)
    return angles.cos().to(device), angles.sin().to(device)


def _inputs(B, T, H, H_kv, D, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q, k, dq_out, dk_out = (torch.randn(B, T, h, D, generator=gen).to(device, dtype) for h in (H, H_kv, H, H_kv))
    return q, k, dq_out, dk_out


def _run(fn, q, k, cos, sin, dq_out, dk_out, **kw):
    """q_out, k_out, dq, dk of ``fn`` on leaf copies of q and k."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k)]
    q_out, k_out = fn(*leaves, cos, sin, **kw)
    return [q_out.detach(), k_out.detach(), *torch.autograd.grad((q_out, k_out), leaves, (dq_out, dk_out))]


def _against_float64(B, T, H, H_kv, D, dtype, seed=0, cos_batch=1):
    q, k, dq_out, dk_out = _inputs(B, T, H, H_kv, D, dtype, seed)
    cos, sin = _tables(cos_batch, T, D)
    got = _run(rotary_embedding, q, k, cos, sin, dq_out, dk_out)
    pytorch = _run(rotary_embedding_ref, q, k, cos, sin, dq_out, dk_out)
    exact = _run(rotary_embedding_ref, *(t.double() for t in (q, k, cos, sin, dq_out, dk_out)))
    for name, g, p, e in zip(NAMES, got, pytorch, exact):
        assert_error_within_twice_pytorch(g, p, e, atol=ATOL[dtype], name=f"{(B, T, H, H_kv, D)} {dtype} {name}")


# --------------------------------------------------------------------------------------------
# against float64

# (B, T, H, H_kv, D): one token and the smallest head dim, GQA, MQA, a padded half (D/2 = 5),
# the largest head dim, many tokens
SHAPES = [(1, 1, 1, 1, 2), (2, 7, 4, 2, 16), (1, 97, 3, 1, 10), (2, 5, 2, 2, 256), (1, 123, 8, 8, 64),
          (1, 1025, 2, 1, 8)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(shape, dtype):
    _against_float64(*shape, dtype, seed=sum(shape))


@needs_kernel
@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 40),
    H_kv=st.integers(1, 3),
    group=st.integers(1, 4),
    half=st.integers(1, 72),
    dtype=st.sampled_from(DTYPES),
    per_batch_tables=st.booleans(),
)
def test_random_shapes(B, T, H_kv, group, half, dtype, per_batch_tables):
    _against_float64(B, T, H_kv * group, H_kv, 2 * half, dtype, seed=T + half,
                     cos_batch=B if per_batch_tables else 1)


# --------------------------------------------------------------------------------------------
# semantics: tables, layouts, one launch, inputs untouched


@needs_kernel
def test_tables_of_batch_one_expanded_or_per_batch_agree():
    B, T, D = 3, 11, 32
    q, k, dq_out, dk_out = _inputs(B, T, 4, 2, D, torch.float32, seed=1)
    cos, sin = _tables(1, T, D)
    shared = _run(rotary_embedding, q, k, cos, sin, dq_out, dk_out)
    expanded = _run(rotary_embedding, q, k, cos.expand(B, -1, -1), sin.expand(B, -1, -1), dq_out, dk_out)
    per_batch = _run(rotary_embedding, q, k, cos.repeat(B, 1, 1), sin.repeat(B, 1, 1), dq_out, dk_out)
    for name, a, b, c in zip(NAMES, shared, expanded, per_batch):
        assert torch.equal(a, b) and torch.equal(a, c), name


@needs_kernel
def test_different_angles_per_batch_entry():
    """Packed or left-padded batches give each entry its own positions."""
    B, T, D = 2, 6, 16
    q, k, dq_out, dk_out = _inputs(B, T, 2, 1, D, torch.float32, seed=2)
    cos, sin = _tables(B, T + 4, D)
    cos, sin = torch.stack([cos[0, :T], cos[1, 4:]]), torch.stack([sin[0, :T], sin[1, 4:]])
    got = _run(rotary_embedding, q, k, cos, sin, dq_out, dk_out)
    for b in range(B):
        alone = _run(rotary_embedding, q[b:b + 1], k[b:b + 1], cos[b:b + 1], sin[b:b + 1], dq_out[b:b + 1],
                     dk_out[b:b + 1])
        for name, a, e in zip(NAMES, got, alone):
            assert torch.equal(a[b:b + 1], e), f"batch {b} {name}"


@needs_kernel
def test_q_and_k_sliced_from_a_fused_projection():
    B, T, H, H_kv, D = 2, 9, 4, 2, 24
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, H + 2 * H_kv, D, generator=gen).to(DEVICE)
    q, k = qkv[:, :, :H], qkv[:, :, H:H + H_kv]
    dq_out = torch.randn(B, H, T, D, generator=gen).to(DEVICE).transpose(1, 2)  # non-contiguous gradients too
    dk_out = torch.randn(B, T, H_kv, D, generator=gen).to(DEVICE)
    assert not (q.is_contiguous() or k.is_contiguous() or dq_out.is_contiguous())
    cos, sin = _tables(1, T, D)
    got = _run(rotary_embedding, q, k, cos, sin, dq_out, dk_out)
    dense = _run(rotary_embedding, q.contiguous(), k.contiguous(), cos, sin, dq_out.contiguous(), dk_out)
    for name, a, b in zip(NAMES, got, dense):
        assert torch.equal(a, b), name
        assert a.is_contiguous(), name


@needs_kernel
def test_one_launch_for_q_and_k_each_way(monkeypatch):
    kernels = importlib.import_module("parallax.kernels.rotary_embedding")
    grids = []

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(kernels, "_rotary_embedding", Recording(kernels._rotary_embedding))
    B, T, H, H_kv, D = 2, 3, 8, 2, 64
    q, k, dq_out, dk_out = _inputs(B, T, H, H_kv, D, torch.float32, seed=4)
    cos, sin = _tables(1, T, D)
    _run(rotary_embedding, q, k, cos, sin, dq_out, dk_out)
    # programs of 64 (token, head) rows: 48 rows of q, 12 of k: one block each; forward, then backward
    assert grids == [(2,), (2,)]


@needs_kernel
def test_inputs_are_not_modified():
    q, k, _, _ = _inputs(1, 5, 2, 1, 8, torch.float16, seed=5)
    q0, k0 = q.clone(), k.clone()
    q_out, k_out = rotary_embedding(q, k, *_tables(1, 5, 8))
    assert torch.equal(q, q0) and torch.equal(k, k0)
    assert not torch.equal(q_out, q0) and not torch.equal(k_out, k0)


@needs_kernel
def test_empty_sizes():
    q, k, dq_out, dk_out = _inputs(2, 0, 2, 1, 8, torch.float32)
    got = _run(rotary_embedding, q, k, *_tables(1, 0, 8), dq_out, dk_out)
    assert [t.shape for t in got] == [q.shape, k.shape, q.shape, k.shape]


# --------------------------------------------------------------------------------------------
# the reference is Hugging Face's apply_rotary_pos_emb (fp32)


def test_reference_is_hf_apply_rotary_pos_emb():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    B, T, H, H_kv, D = 2, 13, 4, 2, 32
    config = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=H_kv, rope_theta=500000.0)
    q, k, dq_out, dk_out = _inputs(B, T, H, H_kv, D, torch.float32, seed=6, device="cpu")
    position_ids = torch.arange(T).expand(B, -1) + torch.tensor([[0], [7]])
    cos_full, sin_full = LlamaRotaryEmbedding(config)(q, position_ids)  # (B, T, D): each frequency twice
    assert torch.equal(cos_full[..., :D // 2], cos_full[..., D // 2:])
    hf = _run(lambda q, k, c, s: apply_rotary_pos_emb(q, k, c, s, unsqueeze_dim=2), q, k, cos_full, sin_full,
              dq_out, dk_out)
    ours = _run(rotary_embedding_ref, q, k, cos_full[..., :D // 2], sin_full[..., :D // 2], dq_out, dk_out)
    for name, a, b in zip(NAMES, ours, hf):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------
# errors, dispatch


def test_bad_inputs_name_the_argument():
    q, k, _, _ = _inputs(2, 5, 4, 2, 8, torch.float32, device="cpu")
    cos, sin = _tables(1, 5, 8, device="cpu")
    with pytest.raises(ValueError, match="q has head dim D=7; it must be even"):
        rotary_embedding(q[..., :7], k[..., :7], cos[..., :3], sin[..., :3])
    with pytest.raises(ValueError, match=r"k has shape \(1, 5, 2, 8\); .* it must be \(2, 5, H_kv, 8\)"):
        rotary_embedding(q, k[:1], cos, sin)
    with pytest.raises(ValueError, match=r"k has shape \(2, 5, 2, 6\)"):
        rotary_embedding(q, k[..., :6], cos, sin)
    with pytest.raises(ValueError, match="k has dtype torch.float16 but q has torch.float32"):
        rotary_embedding(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="q has dtype torch.float64"):
        rotary_embedding(q.double(), k.double(), cos, sin)
    with pytest.raises(ValueError, match="cos has dtype torch.bfloat16; it must be float32"):
        rotary_embedding(q, k, cos.bfloat16(), sin)
    with pytest.raises(ValueError, match=r"sin must have shape \(2 or 1, 5, 4\) .* got \(5, 4\)"):
        rotary_embedding(q, k, cos, sin[0])
    with pytest.raises(ValueError, match=r"cos must have shape .* got \(3, 5, 4\)"):
        rotary_embedding(q, k, cos.expand(3, -1, -1), sin)
    with pytest.raises(ValueError, match=r"cos must have shape .* got \(1, 5, 8\)"):
        rotary_embedding(q, k, torch.cat([cos, cos], -1), sin)
    with pytest.raises(ValueError, match="sin is on meta but q is on cpu"):
        rotary_embedding(q, k, cos, sin.to("meta"))
    with pytest.raises(ValueError, match=r"q must be 4-D \(batch, seqlen, heads, head_dim\), got shape \(5, 4, 8\)"):
        rotary_embedding(q[0], k, cos, sin)
    with pytest.raises(TypeError, match="cos must be a torch.Tensor"):
        rotary_embedding(q, k, None, sin)
    with pytest.raises(ValueError, match="backend must be one of 'triton', 'reference' or None"):
        rotary_embedding(q, k, cos, sin, backend="fast")


def test_cpu_without_the_interpreter_runs_the_reference(monkeypatch):
    """What the models get on CPU: the plain PyTorch reference, bit for bit, gradients by autograd."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend("rotary_embedding", "cpu") == "reference"
    q, k, dq_out, dk_out = _inputs(1, 6, 2, 1, 16, torch.float32, seed=7, device="cpu")
    cos, sin = _tables(1, 6, 16, device="cpu")
    for a, b in zip(_run(rotary_embedding, q, k, cos, sin, dq_out, dk_out),
                    _run(rotary_embedding_ref, q, k, cos, sin, dq_out, dk_out)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="backend='triton' cannot run on cpu tensors here"):
        rotary_embedding(q, k, cos, sin, backend="triton")
    if CUDA:
        assert ops.backend("rotary_embedding", "cuda") == "triton"


# --------------------------------------------------------------------------------------------
# GPU: compiled kernel at Llama sizes


@needs_cuda
@pytest.mark.parametrize("shape", [(2, 2048, 32, 8, 128), (1, 4096, 16, 16, 64), (4, 512, 8, 1, 256)], ids=str)
def test_llama_sizes_bf16_on_gpu(shape):
    _against_float64(*shape, torch.bfloat16, seed=shape[1])
