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
