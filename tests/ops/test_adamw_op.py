"""The compiled adamw_ kernels (every SIMD path, CUDA when present) against adamw_ref."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parallax import _extension
from parallax.ops import adamw_, adamw_ref
from tests.helpers import DEVICES, assert_close

needs_ext = pytest.mark.skipif(not _extension.available(), reason=f"parallax._C not loaded: {_extension.load_error()}")
ORDER = {"scalar": 0, "avx2": 1, "avx512": 2}


def _isas() -> list[str]:
    detected = _extension.build_info().get("detected_cpu_isa", "scalar")
    return [isa for isa in ORDER if ORDER[isa] <= ORDER[detected]]


def _inputs(sizes, grad_dtype, out_dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda n, scale=1.0: (torch.randn(n, generator=gen) * scale).to(device)  # noqa: E731
    params = [rand(n) for n in sizes]
    grads = [rand(n).to(grad_dtype) for n in sizes]
    exp_avgs = [rand(n, 0.1) for n in sizes]
    exp_avg_sqs = [rand(n, 0.1).abs() for n in sizes]
    outs = [torch.empty(n, dtype=out_dtype, device=device) for n in sizes] if out_dtype else []
    return params, grads, exp_avgs, exp_avg_sqs, outs


def _run_both(sizes, grad_dtype, out_dtype, device, seed, hyper):
    kernel = _inputs(sizes, grad_dtype, out_dtype, device, seed)
    ref = [[t.clone() for t in group] for group in kernel]
    adamw_(*kernel, **hyper)
    adamw_ref(*ref, **hyper)
    return kernel, ref


HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=7.0, maximize=False)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(device, grad_dtype, out_dtype):
    isas = _isas() if device == "cpu" else [None]
    previous = _extension.cpu_isa()
    try:
        for isa in isas:
            if isa:
                _extension.set_cpu_isa(isa)
            sizes = [1, 7, 15, 16, 17, 97, 123, 1025, 70_001]  # tails, and a tensor over one span
            kernel, ref = _run_both(sizes, grad_dtype, out_dtype, device, seed=3, hyper=HYPER)
            for name, a_list, b_list in zip(("param", "grad", "exp_avg", "exp_avg_sq", "out"), kernel, ref):
                for a, b in zip(a_list, b_list):
                    # Same operations and roundings as the reference, up to torch's sqrt (see below).
                    assert_close(a, b, atol=1e-7, rtol=2e-7, name=f"{isa or device} {name} n={a.numel()}")
            if out_dtype is not None:
                for p, out in zip(kernel[0], kernel[4]):
                    assert torch.equal(out, p.to(out_dtype)), f"{isa}: out is not the rounded fp32 parameter"
    finally:
        if previous:
            _extension.set_cpu_isa(previous)


@needs_ext
@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=6),
    lr=st.floats(1e-5, 1e-1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    weight_decay=st.floats(0.0, 0.5),
    step=st.integers(1, 10_000),
    maximize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_matches_reference_on_random_hyperparameters(sizes, lr, beta1, beta2, weight_decay, step, maximize, seed):
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=weight_decay, step=float(step), maximize=maximize)
    before = [p.clone() for p in _inputs(sizes, torch.float32, None, "cpu", seed)[0]]
    kernel, ref = _run_both(sizes, torch.float32, torch.bfloat16, "cpu", seed, hyper)
    # torch's CPU sqrt (Sleef, 0.5001 ulp) is not always correctly rounded, the kernel's is: the
    # update may differ by an ulp or two, so bound the error by ulps of |p| + |update|, which
    # stays meaningful when a large update nearly cancels the old value.
    for p0, a, b in zip(before, kernel[0], ref[0]):
        scale = p0.abs() + (b - p0).abs()
        bad = (a - b).abs() > 1e-7 + 4e-7 * scale
        assert not bad.any(), f"{int(bad.sum())} params differ beyond 4 ulps of |p| + |update|"
    for a_list, b_list in zip(kernel[2:4], ref[2:4]):
        for a, b in zip(a_list, b_list):
            assert_close(a, b, atol=1e-7, rtol=2e-7)
    for p, out in zip(kernel[0], kernel[4]):
        assert torch.equal(out, p.to(torch.bfloat16)), "out must be the rounded fp32 parameter"


def test_bf16_rounding_matches_torch_including_nan_and_ties():
    if not _extension.available():
        pytest.skip("parallax._C not loaded")
    # Values whose low 16 bits sit exactly on a tie, plus NaN and infinities.
    special = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    n = special.numel()
    params = [special.clone()]
    # lr = 0 and no decay leave the parameter unchanged, so `out` is just its rounding.
    hyper = dict(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1.0)
    previous = _extension.cpu_isa()
    try:
        for isa in _isas():
            _extension.set_cpu_isa(isa)
            out = [torch.empty(n, dtype=torch.bfloat16)]
            adamw_(params, [torch.zeros(n)], [torch.zeros(n)], [torch.zeros(n)], out, **hyper)
            finite = ~special.isnan()
            expected = special.to(torch.bfloat16)
            assert torch.equal(out[0].view(torch.int16)[finite], expected.view(torch.int16)[finite]), isa
            assert out[0][special.isnan()].isnan().all(), isa
    finally:
        _extension.set_cpu_isa(previous)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a["grads"].pop(), "grads has"),
        (lambda a: a["exp_avgs"].__setitem__(0, torch.zeros(3)), "exp_avgs\\[0\\] has shape"),
        (lambda a: a.__setitem__("step", 0), "step must be >= 1"),
        (lambda a: a.__setitem__("params_out", [torch.zeros(5)]), "params_out must be empty"),
        (lambda a: a["params"].__setitem__(0, torch.zeros(5, dtype=torch.complex64)), "params\\[0\\] is torch.complex"),
    ],
)
def test_launcher_rejects_bad_input_with_a_clear_message(mutate, message):
    args = dict(params=[torch.zeros(5), torch.zeros(2)], grads=[torch.zeros(5), torch.zeros(2)],
                exp_avgs=[torch.zeros(5), torch.zeros(2)], exp_avg_sqs=[torch.zeros(5), torch.zeros(2)],
                params_out=[], step=1)
    mutate(args)
    step = args.pop("step")
    with pytest.raises(ValueError, match=message):
        adamw_(**args, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=step)


def test_import_survives_a_missing_extension_with_one_warning():
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["parallax._C"] = None  # makes `from parallax import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import parallax as px
        ours = [w for w in caught if "parallax._C" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "halted" in str(ours[0].message), "the warning must name the reason"
        assert px.ops.backend("adamw", "cpu") == "reference"
        import torch
        p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
        px.optim.AdamW([p], lr=0.1, weight_decay=0.0).step()
        assert torch.allclose(p, torch.full((3,), 0.9)), p
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


@needs_ext
def test_registration_passes_torch_library_opcheck():
    """Schema, fake (meta) implementation and autograd registration, as torch.library checks them."""
    n = [5, 7]
    args = ([torch.randn(k) for k in n], [torch.randn(k) for k in n], [torch.randn(k) for k in n],
            [torch.rand(k) for k in n], [torch.empty(k, dtype=torch.bfloat16) for k in n],
            1e-3, 0.9, 0.999, 1e-8, 0.01, 3.0, False)
    results = torch.library.opcheck(torch.ops.parallax.adamw_.default, args)
    assert all(v == "SUCCESS" for v in results.values()), results
    a, b, c = torch.randn(9), torch.randn(9), torch.randn(9)
    results = torch.library.opcheck(torch.ops.parallax.stream_triad_.default, (a, b, c, 2.0))
    assert all(v == "SUCCESS" for v in results.values()), results
