"""The C++ STREAM triad (the benchmark floor's bandwidth probe) against its reference."""

import pytest
import torch

from parallax import ops


@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 97, 1025, 1_000_003])
@pytest.mark.parametrize("in_place", [False, True])
def test_triad_matches_reference(n, in_place):
    gen = torch.Generator().manual_seed(n)
    a, b, c = (torch.randn(n, generator=gen) for _ in range(3))
    if in_place:
        b = a
    expected = b + 0.37 * c
    assert ops.stream_triad_(a, b, c, 0.37) is a
    assert torch.allclose(a, expected, rtol=1e-6, atol=1e-7)


def test_triad_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="c has shape"):
        ops.stream_triad_(torch.zeros(4), torch.zeros(4), torch.zeros(5), 1.0)
    with pytest.raises(ValueError, match="b must be float32"):
        ops.stream_triad_(torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.zeros(4), 1.0)
