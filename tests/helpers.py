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
