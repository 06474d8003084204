"""Shared test helpers: an element-wise comparison that explains its failures, and the devices to test."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0, name: str = "") -> None:
    """Element-wise |actual - expected| <= atol + rtol*|expected|, reporting the worst mismatches and any NaN."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN at {int((nan_a ^ nan_e).sum())} positions that differ"
    diff = (actual - expected).abs().nan_to_num(0.0)
    bad = diff > atol + rtol * expected.abs().nan_to_num(0.0)
    if bad.any():
        idx = bad.flatten().nonzero().flatten()[:5]
        rows = ", ".join(
            f"[{i}] {actual.flatten()[i].item():.9g} vs {expected.flatten()[i].item():.9g}" for i in idx.tolist()
        )
        pytest.fail(f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (max {diff.max().item():.3g}, "
                    f"atol {atol}, rtol {rtol}); first: {rows}")


def triton_interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run kernels in this environment, or None.

    With triton < 3.8 and numpy >= 2.4 every loop over a runtime bound fails inside the
    interpreter (triton-lang/triton#9171); the kernels' tests skip with this reason there.
    """
    try:
        import numpy
        import triton
    except ImportError as exc:
        return f"triton or numpy is not installed ({exc})"

    def version(text: str) -> tuple[int, int]:
        major, minor = text.split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)

    if version(triton.__version__) < (3, 8) and version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__} with numpy {numpy.__version__}: the interpreter fails on loops over "
                "runtime bounds (triton-lang/triton#9171); use triton >= 3.8 or numpy < 2.4")
    return None


def assert_error_within_twice_pytorch(got: torch.Tensor, pytorch: torch.Tensor, exact: torch.Tensor, *,
                                      atol: float, name: str = "") -> None:
    """FlashAttention's rule: ``got``'s max error against ``exact`` (a float64 reference) is at most
    twice the error of ``pytorch`` (PyTorch's own computation at ``got``'s precision) plus
    ``atol`` times the largest |exact| (at least 1). Also checks dtype, shape and finiteness."""
    assert got.dtype == pytorch.dtype and got.shape == exact.shape, (
        f"{name}: {got.dtype} {tuple(got.shape)}, expected {pytorch.dtype} {tuple(exact.shape)}")
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if got.numel() == 0:
        return
    exact = exact.detach().double().cpu()
    err = (got.detach().double().cpu() - exact).abs().max().item()
    ref_err = (pytorch.detach().double().cpu() - exact).abs().max().item()
    bound = 2 * ref_err + atol * max(1.0, exact.abs().max().item())
    assert err <= bound, (f"{name}: max error {err:.3g} against float64 exceeds twice PyTorch's {pytorch.dtype} "
                          f"error {ref_err:.3g} + {atol} x scale")


def interpreter_rounds_bf16_like_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make Triton's CPU interpreter convert fp32 to bf16 by rounding to nearest even, as compiled
    kernels do (``cvt.rn.bf16.f32``) and as PyTorch does; the interpreter (3.9 at least) truncates
    toward zero, an error of up to one bf16 ulp per conversion that no GPU makes. For the tests
    of kernels that compute in fp32 and round once to bf16."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return truncating_cast(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


def context_sensitive_gpt(**config) -> torch.nn.Module:
    """A tiny random GPT (``GPTConfig(**config)``, seed 0, eval mode) whose next token depends on the
    context: a fresh one barely attends and repeats one token, and its logits are nearly flat.
    Sharper attention and stronger residual branches make ~97% of next tokens depend on the context;
    a larger final LayerNorm gain spreads the logits so that a greedy choice never hinges on rounding."""
    from parallax.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**config))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8)
            block.attn.c_proj.weight.mul_(30)
            block.mlp.c_proj.weight.mul_(30)
        model.transformer.ln_f.weight.mul_(20)
    return model.eval()
