"""The compiled unscale_ kernels (every SIMD path, CUDA when present) against unscale_ref."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parallax import _extension, ops
from parallax.ops import unscale_, unscale_ref
from tests.helpers import CUDA, DEVICES

needs_ext = pytest.mark.skipif(not _extension.available(), reason=f"parallax._C not loaded: {_extension.load_error()}")
ORDER = {"scalar": 0, "avx2": 1, "avx512": 2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NONFINITE = [float("inf"), -float("inf"), float("nan")]
# Tails of every SIMD width, and a tensor over one 64K-element span (the CPU's unit of work).
SIZES = [1, 7, 15, 16, 17, 97, 123, 1025, 70_001]


def _isas(device: str) -> list[str | None]:
    if device != "cpu":
        return [None]
    detected = _extension.build_info().get("detected_cpu_isa", "scalar")
    return [isa for isa in ORDER if ORDER[isa] <= ORDER[detected]]


class _on_isa:
    """Run the CPU kernels on ``isa`` (None: leave as is) for the duration of a with-block."""

    def __init__(self, isa: str | None) -> None:
        self.isa = isa

    def __enter__(self):
        self.previous = _extension.cpu_isa()
        if self.isa:
            _extension.set_cpu_isa(self.isa)

    def __exit__(self, *exc):
        if self.isa and self.previous:
            _extension.set_cpu_isa(self.previous)


def _grads(sizes, dtypes, device, seed, planted=()):
    """Random gradients spanning many magnitudes (fp16 results reach its subnormals), with the
    non-finite values ``planted`` as (tensor index, position, value)."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for n, dtype in zip(sizes, dtypes):
        magnitude = 10.0 ** (torch.rand(n, generator=gen) * 8 - 4)
        g = torch.randn(n, generator=gen) * magnitude
        grads.append(g.to(dtype))
    for t, pos, value in planted:
        grads[t][pos] = value
    return [g.to(device) for g in grads]


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Bitwise equal, except that any NaN equals any NaN (payloads differ between conversions)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), f"{name}: NaN at different positions"
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}.get(actual.dtype, torch.int16)
    a, e = actual.view(bits)[~nan_a], expected.view(bits)[~nan_e]
    diff = (a != e).nonzero().flatten()
    if diff.numel():
        i = int(diff[0])
        pytest.fail(f"{name}: {diff.numel()} elements differ; first: {actual[~nan_a][i].item()!r} vs "
                    f"{expected[~nan_e][i].item()!r}")


def _run_both(grads, found_value, inv_scale):
    """The kernel (through the launcher) and the reference on copies; (grads, found) of each."""
    device = grads[0].device
    kernel, ref = [g.clone() for g in grads], [g.clone() for g in grads]
    found_k = torch.full((1,), found_value, device=device)
    found_r = torch.full((1,), found_value, device=device)
    unscale_(kernel, found_k, inv_scale)
    unscale_ref(ref, found_r, inv_scale)
    return (kernel, found_k), (ref, found_r)


# One non-finite value alone: in a 1-element tensor, in SIMD bodies (n=123 at 50, n=16 at 15), in
# the scalar tails (n=17 at 16, n=1025 at 1024), in the tail of a tensor's second 64K span.
SPOTS = [(0, 0, NONFINITE[0]), (6, 50, NONFINITE[2]), (4, 16, NONFINITE[1]), (7, 1024, NONFINITE[0]),
         (3, 15, NONFINITE[2]), (8, 70_000, NONFINITE[2])]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spot", [None, *SPOTS], ids=["finite", *(f"{t}-{p}" for t, p, _ in SPOTS)])
def test_kernel_matches_reference(device, dtype, spot):
    for isa in _isas(device):
        with _on_isa(isa):
            grads = _grads(SIZES, [dtype] * len(SIZES), device, seed=5, planted=[spot] if spot else ())
            (kernel, found_k), (ref, found_r) = _run_both(grads, 0.0, 2.0**-13)
            for g, a, b in zip(grads, kernel, ref):
                _assert_same(a, b, f"{isa or device} {dtype} n={g.numel()}")
            expected = 0.0 if spot is None else 1.0
            assert found_k.item() == found_r.item() == expected, f"{isa or device}: found_inf {found_k.item()}"


@needs_ext
@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([1, 7, 8, 15, 16, 17, 31, 33, 97, 1025]) | st.integers(1, 3000),
                   min_size=1, max_size=6),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=6, max_size=6),
    bad=st.lists(st.tuples(st.integers(0, 5), st.floats(0.0, 1.0, exclude_max=True), st.sampled_from(NONFINITE)),
                 max_size=3),
    inv_scale=st.sampled_from([1.0, 0.5, 2.0**-16, 2.0**-24]) | st.floats(1e-8, 4.0),
    found_before=st.sampled_from([0.0, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_matches_reference_on_random_gradients(sizes, dtypes, bad, inv_scale, found_before, seed):
    """Random sizes (tails included), mixed dtypes in one list, inf/NaN planted at random positions."""
    planted = [(t % len(sizes), int(frac * sizes[t % len(sizes)]), v) for t, frac, v in bad]
    for device in DEVICES:
        for isa in _isas(device):
            with _on_isa(isa):
                grads = _grads(sizes, dtypes, device, seed, planted)
                (kernel, found_k), (ref, found_r) = _run_both(grads, found_before, inv_scale)
                for i, (a, b) in enumerate(zip(kernel, ref)):
                    _assert_same(a, b, f"{isa or device} grads[{i}] {a.dtype} n={a.numel()}")
                expected = 1.0 if planted or found_before else 0.0
                assert found_k.item() == found_r.item() == expected, (isa, found_k.item(), found_r.item())


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_is_only_ever_set_never_cleared(device):
    finite = _grads([33, 5], [torch.float32, torch.bfloat16], device, seed=1)
    found = torch.zeros(1, device=device)
    unscale_([g.clone() for g in finite], found, 0.25)
    assert found.item() == 0.0, "finite gradients must leave found_inf at 0"
    found.fill_(1.0)
    unscale_([g.clone() for g in finite], found, 0.25)
    assert found.item() == 1.0, "an already-set found_inf must stay 1"
    for value in NONFINITE:
        found.zero_()
        grads = [g.clone() for g in finite]
        grads[1][4] = value
        unscale_(grads, found, 0.25)
        assert found.item() == 1.0, f"{value} was not detected"
        assert grads[1][4].isnan() if value is NONFINITE[2] else grads[1][4].item() == value, "non-finite values stay"
    # A zero-dim flag works too, and an empty list changes nothing.
    flag = torch.zeros((), device=device)
    unscale_([], flag, 0.5)
    assert flag.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_result_is_bitwise_torch_mul(device):
    for isa in _isas(device) if _extension.available() else [None]:
        with _on_isa(isa):
            for inv_scale in (2.0**-16, 1 / 3, 0.1, 1.7):
                g = _grads([1025], [torch.float32], device, seed=2)[0]
                expected = g.clone().mul_(inv_scale)
                unscale_([g], torch.zeros(1, device=device), inv_scale)
                _assert_same(g, expected, f"{isa} inv_scale={inv_scale}")


def test_inputs_the_kernel_cannot_take_go_to_the_reference_in_the_same_call():
    base = _grads([40, 40, 9], [torch.float32, torch.float16, torch.float32], "cpu", seed=3)
    strided = torch.randn(40, 2)[:, 0]  # non-contiguous
    strided[3] = float("nan")
    double = torch.randn(9, dtype=torch.float64)
    grads = [*base, strided, double]
    expected = [g.clone() for g in grads]
    found, found_ref = torch.zeros(1), torch.zeros(1)
    unscale_(grads, found, 0.125)
    unscale_ref(expected, found_ref, 0.125)
    for i, (a, b) in enumerate(zip(grads, expected)):
        _assert_same(a, b, f"grads[{i}]")
    assert found.item() == 1.0, "the NaN in the non-contiguous gradient was missed"
    assert not strided.is_contiguous(), "the caller's tensor must be updated in place"


@pytest.mark.parametrize(
    "grads, found, inv_scale, message",
    [
        ([torch.ones(3)], torch.zeros(2), 1.0, "one-element float32"),
        ([torch.ones(3)], torch.zeros(1, dtype=torch.float64), 1.0, "one-element float32"),
        ([torch.ones(3, dtype=torch.int32)], torch.zeros(1), 1.0, "grads\\[0\\] has dtype torch.int32"),
        ([torch.ones(3)], torch.zeros(1, device="meta"), 1.0, "grads\\[0\\] is on cpu but found_inf is on meta"),
        ([torch.ones(3)], torch.zeros(1), 0.0, "inv_scale must be a positive finite number"),
        ([torch.ones(3)], torch.zeros(1), float("inf"), "inv_scale must be a positive finite number"),
    ],
)
def test_launcher_rejects_bad_input_with_a_clear_message(grads, found, inv_scale, message):
    with pytest.raises(ValueError, match=message):
        unscale_(grads, found, inv_scale)


@needs_ext
def test_the_cpu_op_rejects_what_it_cannot_take():
    with pytest.raises(RuntimeError, match="must be a contiguous CPU tensor"):
        torch.ops.parallax.unscale_([torch.ones(4, 2)[:, 0]], torch.zeros(1), 1.0)
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        torch.ops.parallax.unscale_([torch.ones(4, dtype=torch.float64)], torch.zeros(1), 1.0)
    with pytest.raises(RuntimeError, match="one-element float32 CPU tensor"):
        torch.ops.parallax.unscale_([torch.ones(4)], torch.zeros(2), 1.0)


@needs_ext
def test_backend_names_the_compiled_kernel():
    assert ops.backend("unscale", "cpu") == "cpp"
    assert ops.backend("unscale", "cuda") == ("cuda" if _extension.has_kernel("unscale_", "cuda") else "reference")


@needs_ext
def test_registration_passes_torch_library_opcheck():
    """Schema, fake (meta) implementation and autograd registration, as torch.library checks them."""
    for planted in (False, True):
        grads = _grads([5, 17, 33], DTYPES, "cpu", seed=4, planted=[(1, 3, float("inf"))] if planted else ())
        results = torch.library.opcheck(torch.ops.parallax.unscale_.default, (grads, torch.zeros(1), 0.5))
        assert all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.skipif(not _extension.has_kernel("unscale_", "cuda"), reason="parallax._C was built without CUDA kernels")
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (test_cuda_sources_compile.py compile-checks the kernel)")
def test_cuda_kernel_over_many_launches():
    """More tensors (150 > 110) and chunks (330 > 320) than one launch holds, a tensor continuing
    into the next launch, and a NaN only in that tensor's last chunk."""
    sizes = [3] * 150 + [330 * 65536 + 5] + [17] * 3
    grads = [torch.randn(n, device="cuda").to(torch.float16 if i % 3 == 0 else torch.float32)
             for i, n in enumerate(sizes)]
    (kernel, found_k), (ref, found_r) = _run_both(grads, 0.0, 2.0**-10)
    for i, (a, b) in enumerate(zip(kernel, ref)):
        _assert_same(a, b, f"grads[{i}]")
    assert found_k.item() == found_r.item() == 0.0
    grads[150][-1] = float("nan")
    (kernel, found_k), _ = _run_both(grads, 0.0, 2.0**-10)
    assert found_k.item() == 1.0, "a NaN in the last chunk of a tensor split over launches was missed"
