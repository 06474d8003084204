"""Fused linear + cross-entropy (chunked PyTorch and Triton backends) against float64 references.

The loss and every gradient (x, weight, bias) are compared with ``linear_cross_entropy_ref`` in
float64 on fresh random inputs, by FlashAttention's rule: the error may be at most twice the
error of the reference computed in the inputs' own dtype (which rounds the logits to that dtype
before its fp32 softmax, as the fused op does) plus a small atol. On CPU the Triton kernel runs
under Triton's interpreter (TRITON_INTERPRET=1, set here when there is no GPU and it is not set
already), with small shapes; the kernel has no ``tl.dot``, so bf16 runs in the interpreter too.
Chunks are forced small (``_chunk_rows`` patched) so that every shape spans several chunks with
a partial last one, and 16-bit weight gradients accumulate in 3 vocabulary blocks, except where
the chunk heuristic itself is under test.
"""

from __future__ import annotations

import importlib
import itertools
import os

import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from parallax import ops  # noqa: E402
from parallax.ops import linear_cross_entropy, linear_cross_entropy_ref  # noqa: E402
from tests.helpers import CUDA, triton_interpreter_problem  # noqa: E402

lce = importlib.import_module("parallax.ops.linear_cross_entropy")  # the module (the package exports the function)

DEVICE = "cuda" if CUDA else "cpu"
INTERPRETER_PROBLEM = None if CUDA else triton_interpreter_problem()
KERNEL = ops.backend("linear_cross_entropy", DEVICE) == "triton" and INTERPRETER_PROBLEM is None
KERNEL_REASON = INTERPRETER_PROBLEM or "no GPU and TRITON_INTERPRET is not enabled: the Triton kernel cannot run here"
needs_kernel = pytest.mark.skipif(not KERNEL, reason=KERNEL_REASON)
BACKENDS = ["chunked", pytest.param("triton", marks=needs_kernel)]
CHUNK_ROWS = 32  # forced chunk size: 97 and 123 rows span 4 chunks, the last one partial

# atol added to 2x the reference's own error, relative to the largest exact value (at least 1)
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(lce, "_chunk_rows", lambda *_: CHUNK_ROWS)
    monkeypatch.setattr(lce, "_weight_grad_blocks", lambda v: min(3, v))


# --------------------------------------------------------------------------------------------
# helpers


def _inputs(n, c, v, dtype, *, bias=False, ignore_every=0, seed=0, ignore_index=-100):
    """x (n, c), weight (v, c), bias (v,) or None in ``dtype``; targets (n,) with every
    ``ignore_every``-th one set to ``ignore_index``. Logits come out with a spread of a few units."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=gen)
    weight = torch.randn(v, c, generator=gen) * (2.0 / c**0.5)
    b = torch.randn(v, generator=gen) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = ignore_index
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return cast(x), cast(weight), cast(b), targets.to(DEVICE)


def _run(fn, x, weight, bias, targets, grad_out_seed=1, **kw):
    """[loss, grad_x, grad_weight(, grad_bias)] of ``fn`` on leaf copies, with a random output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    b = leaves[2] if bias is not None else None
    loss = fn(leaves[0], leaves[1], targets, bias=b, **kw)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.device, loss.dtype)
    grads = torch.autograd.grad(loss, leaves, grad_out)
    return [loss.detach(), *grads]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).nan_to_num(0.0).abs().max().item() if a.numel() else 0.0


def _check_rule(got, in_dtype, exact, dtype, what=""):
    """The loss and each gradient: err vs float64 <= 2 x the dtype reference's err + atol."""
    names = ("loss", "grad_x", "grad_weight", "grad_bias")
    for name, g, p, e in zip(names, got, in_dtype, exact):
        want = torch.float32 if name == "loss" else dtype
        assert g.dtype == want and g.shape == e.shape, f"{what} {name}: {g.dtype} {tuple(g.shape)}"
        assert torch.equal(torch.isnan(g), torch.isnan(e)), f"{what} {name}: NaN where the reference has none"
        err, ref_err = _max_err(g, e), _max_err(p, e)
        bound = 2 * ref_err + ATOL[dtype] * max(1.0, e.nan_to_num(0.0).abs().max().item() if e.numel() else 0.0)
        assert err <= bound, (f"{what} {name}: max error {err:.3g} vs float64 exceeds 2 x the {dtype} reference's "
                              f"error {ref_err:.3g} + atol")


def _against_float64(n, c, v, dtype, reduction, backend, *, bias=False, ignore_every=0, seed=0, ignore_index=-100):
    x, weight, b, targets = _inputs(n, c, v, dtype, bias=bias, ignore_every=ignore_every, seed=seed,
                                    ignore_index=ignore_index)
    kw = dict(reduction=reduction, ignore_index=ignore_index)
    got = _run(linear_cross_entropy, x, weight, b, targets, backend=backend, **kw)
    in_dtype = _run(linear_cross_entropy_ref, x, weight, b, targets, **kw)
    exact = _run(linear_cross_entropy_ref, *(None if t is None else t.double() for t in (x, weight, b)), targets,
                 **kw)
    _check_rule(got, in_dtype, exact, dtype, f"N={n} C={c} V={v} {reduction} {backend}")


# --------------------------------------------------------------------------------------------
# the sweep: every (N, V) of the odd sizes, dtypes and reductions rotated over them


SHAPES = list(itertools.product([1, 7, 97, 123], [7, 97, 1025]))  # (N, V)
DTYPE_REDUCTIONS = list(itertools.product([torch.float32, torch.float16, torch.bfloat16], ["mean", "sum", "none"]))
CASES = [(n, v, *DTYPE_REDUCTIONS[i % len(DTYPE_REDUCTIONS)], i % 2 == 1) for i, (n, v) in enumerate(SHAPES)]


def _case_id(case) -> str:
    n, v, dtype, reduction, bias = case
    return f"N{n}-V{v}-{str(dtype).removeprefix('torch.')}-{reduction}{'-bias' if bias else ''}"


def test_sweep_covers_every_dtype_and_reduction():
    assert {(d, r) for _, _, d, r, _ in CASES} == set(DTYPE_REDUCTIONS)
    assert {(n, v) for n, v, *_ in CASES} == set(SHAPES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64_reference(small_chunks, backend, case):
    n, v, dtype, reduction, bias = case
    _against_float64(n, 16, v, dtype, reduction, backend, bias=bias, ignore_every=5 if n > 1 else 0, seed=n + v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_reduction_and_dtype_with_ignored_rows(small_chunks, backend, dtype, reduction):
    """Ignored rows (every 3rd, and a custom ignore_index that is a valid class id) over 3 chunks."""
    _against_float64(70, 24, 97, dtype, reduction, backend, bias=True, ignore_every=3, seed=7, ignore_index=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_matches_f_cross_entropy(small_chunks, backend, reduction):
    """No counted target: 'mean' is NaN (0 / 0) and 'sum' 0, as F.cross_entropy; gradients are 0."""
    x, weight, b, targets = _inputs(40, 8, 33, torch.float32, bias=True)
    targets.fill_(-100)
    got = _run(linear_cross_entropy, x, weight, b, targets, reduction=reduction, backend=backend)
    ref = _run(linear_cross_entropy_ref, x, weight, b, targets, reduction=reduction)
    assert torch.equal(torch.isnan(got[0]), torch.isnan(ref[0])) and bool(torch.isnan(got[0]).all()) == (
        reduction == "mean")
    assert torch.equal(got[0].nan_to_num(0.0), ref[0].nan_to_num(0.0))
    for g in got[1:]:
        assert torch.equal(g, torch.zeros_like(g))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(0, 60), c=st.integers(1, 12), v=st.integers(1, 80), rows=st.integers(1, 64),
       reduction=st.sampled_from(["mean", "sum", "none"]), bias=st.booleans(), ignore_every=st.integers(0, 4),
       seed=st.integers(0, 2**16))
def test_random_shapes_chunked(n, c, v, rows, reduction, bias, ignore_every, seed):
    """The chunked algorithm on any shape and chunk size, fp32 against float64 (fast: no interpreter)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lce, "_chunk_rows", lambda *_: rows)
        _against_float64(n, c, v, torch.float32, reduction, "chunked", bias=bias, ignore_every=ignore_every,
                         seed=seed)


# --------------------------------------------------------------------------------------------
# gradients only where needed, no-grad mode, strided inputs


class _OpRecorder(TorchDispatchMode):
    """Records every aten op run and the largest tensor storage any op returned."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest_bytes = max(self.largest_bytes, t.untyped_storage().nbytes())
        return out

    def matmuls(self) -> int:
        return sum(name in ("mm", "addmm", "addmm_") for name in self.ops)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", ["weight", "x"])
def test_frozen_weight_or_x_gets_no_gradient_and_no_matmul(small_chunks, backend, frozen):
    """A frozen lm_head (LoRA) or an x without grad: the other gradient is right and the frozen one's
    matmul is skipped (2 matmuls per chunk instead of 3)."""
    x, weight, _, targets = _inputs(70, 16, 97, torch.float32, ignore_every=4)
    x.requires_grad_(frozen == "weight")
    weight.requires_grad_(frozen == "x")
    with _OpRecorder() as rec:
        loss = linear_cross_entropy(x, weight, targets, backend=backend)
        loss.backward()
    chunks = -(-70 // CHUNK_ROWS)
    assert rec.matmuls() == 2 * chunks
    live, dead = (x, weight) if frozen == "weight" else (weight, x)
    loss_ref = linear_cross_entropy_ref(x.double(), weight.double(), targets)
    expected = torch.autograd.grad(loss_ref, live)[0]
    assert dead.grad is None
    assert _max_err(live.grad, expected) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_mode_computes_the_loss_only(small_chunks, backend):
    x, weight, _, targets = _inputs(50, 8, 40, torch.float32, ignore_every=3)
    x.requires_grad_()
    with torch.no_grad(), _OpRecorder() as rec:
        loss = linear_cross_entropy(x, weight, targets, backend=backend)
    assert loss.grad_fn is None and rec.matmuls() == -(-50 // CHUNK_ROWS)
    assert _max_err(loss, linear_cross_entropy_ref(x.double(), weight.double(), targets)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_repeated_backward(small_chunks, backend):
    """x a column slice, weight a transposed view, targets strided; backward twice (retain_graph)."""
    x_wide, weight, _, targets_wide = _inputs(60, 32, 45, torch.float32)
    x = x_wide[:, ::2].detach().requires_grad_()
    weight_t = weight.t().contiguous().detach().requires_grad_()  # (C, V): weight_t.t() is a strided view
    targets = torch.cat([targets_wide, targets_wide])[::2]
    loss = linear_cross_entropy(x, weight_t.t()[:, ::2], targets[:60], backend=backend)
    first = torch.autograd.grad(loss, (x, weight_t), retain_graph=True)
    second = torch.autograd.grad(loss, (x, weight_t))
    xd, wd = x.detach().double().requires_grad_(), weight_t.detach().double().requires_grad_()
    exact = torch.autograd.grad(linear_cross_entropy_ref(xd, wd.t()[:, ::2], targets[:60]), (xd, wd))
    for a, b, e in zip(first, second, exact):
        assert torch.equal(a, b) and _max_err(a, e) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_backward_takes_the_forward_gradients_without_copying_them(small_chunks, backend):
    """loss.backward() (grad_output exactly 1): the backward runs no op on the weight-sized
    gradient computed in the forward, autograd takes it as it is; another grad_output scales it."""
    x, weight, _, targets = _inputs(40, 8, 33, torch.float32, ignore_every=3)
    x.requires_grad_()
    weight.requires_grad_()
    loss = linear_cross_entropy(x, weight, targets, backend=backend)
    with _OpRecorder() as rec:
        loss.backward()
    assert not {"mul", "clone", "copy_"} & set(rec.ops), rec.ops
    once = (x.grad.clone(), weight.grad.clone())
    x.grad = weight.grad = None
    (linear_cross_entropy(x, weight, targets, backend=backend) * 3).backward()
    assert _max_err(x.grad, 3 * once[0]) < 1e-6 and _max_err(weight.grad, 3 * once[1]) < 1e-6


# --------------------------------------------------------------------------------------------
# memory: the (N, V) logits never exist


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_full_logits_are_never_materialised(monkeypatch, backend, reduction):
    """With the chunk heuristic itself (its floors lowered to fit a small test): no tensor created
    during forward + backward reaches a quarter of the (N, V) fp32 logits, while the reference's
    does (so the probe sees them when they exist); the losses agree."""
    monkeypatch.setattr(lce, "_MIN_CHUNK_BYTES_CPU", 0)
    monkeypatch.setattr(lce, "_MIN_CHUNK_ROWS_CUDA", 0)
    n, c, v = 256, 32, 512  # chunks of N * C // V = 16 rows: 16 chunks; weight (V, C) is N / C = 8x smaller
    x, weight, _, targets = _inputs(n, c, v, torch.float32, ignore_every=7)
    logits_bytes = n * v * 4
    results = {}
    for name, fn, kw in (("fused", linear_cross_entropy, dict(backend=backend)), ("ref", linear_cross_entropy_ref, {})):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
        with _OpRecorder() as rec:
            loss = fn(*leaves, targets, reduction=reduction, **kw)
            loss.sum().backward()
        results[name] = (rec.largest_bytes, loss.detach())
    assert results["ref"][0] >= logits_bytes
    assert results["fused"][0] < logits_bytes / 4, f"largest tensor {results['fused'][0]} bytes"
    assert _max_err(results["fused"][1], results["ref"][1]) < 1e-4


def test_chunk_heuristic():
    # CUDA, 8k tokens x 128k vocabulary, bf16: the 1024-row floor (x alone would allow 261 rows)
    assert lce._chunk_rows(8192, 4096, 128256, 2, "cuda") == 1024
    # CPU: as many elements as x (261 rows), down to a multiple of 128; the bench's CPU shape: the floor
    assert lce._chunk_rows(8192, 4096, 128256, 2, "cpu") == 256
    assert lce._chunk_rows(512, 256, 128256, 4, "cpu") == 32
    # many tokens over a small vocabulary: the logits chunk as large as x (16777 rows), tile-aligned
    assert lce._chunk_rows(65536, 8192, 32000, 2, "cuda") == 16768
    # at most half the rows (never the full logits); a single row is one chunk
    assert lce._chunk_rows(100, 16, 1000, 4, "cpu") == 50
    assert lce._chunk_rows(1, 16, 1000, 4, "cuda") == 1


def test_16bit_weight_gradient_is_rounded_block_by_block():
    """The fp32 accumulator of a bf16 weight's gradient is rounded one vocabulary block at a time:
    the peak is the fp32 accumulator plus one block, not plus a whole bf16 copy."""
    from parallax.planner import CpuMemoryProfile

    weight = torch.zeros(4096, 64, dtype=torch.bfloat16)
    fp32_bytes = weight.numel() * 4
    prof = CpuMemoryProfile()
    with prof:
        acc = lce._WeightGrad(weight)
        acc.parts[-1].fill_(1.5)
        grad = acc.result()
        del acc
    assert grad.dtype == torch.bfloat16 and grad.shape == weight.shape
    assert bool((grad[-1] == 1.5).all()) and bool((grad[0] == 0).all())
    peak = prof.peak()[0]
    assert peak <= fp32_bytes + fp32_bytes // 2 // lce._WEIGHT_GRAD_BLOCKS + (64 << 10), peak


# --------------------------------------------------------------------------------------------
# dispatch and bad input


def test_backend_reporting(monkeypatch):
    from parallax.ops import _triton

    expected = "triton" if CUDA or _triton.interpreting() else "chunked"
    assert ops.backend("linear_cross_entropy", DEVICE) == expected
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    assert ops.backend("linear_cross_entropy", "cpu") == "chunked"
    x, weight, _, targets = _inputs(4, 8, 5, torch.float32)
    if not CUDA:
        with pytest.raises(ValueError, match="backend='triton' cannot run on cpu"):
            linear_cross_entropy(x, weight, targets, backend="triton")
    ref = linear_cross_entropy(x, weight, targets, backend="reference")
    assert torch.equal(ref, linear_cross_entropy_ref(x, weight, targets))


def _bad_calls():
    x = torch.randn(4, 8)
    w = torch.randn(5, 8)
    t = torch.tensor([0, 1, 4, -100])
    return [
        (dict(x=x.numpy()), TypeError, "x must be a torch.Tensor"),
        (dict(x=x[None]), ValueError, r"x must be 2-D \(tokens N, hidden C\)"),
        (dict(weight=torch.randn(5, 7)), ValueError, r"weight must be 2-D \(vocab V >= 1, hidden C = 8\)"),
        (dict(weight=torch.randn(0, 8)), ValueError, "weight must be 2-D"),
        (dict(targets=t[:3]), ValueError, r"targets must have shape \(N,\) = \(4,\)"),
        (dict(targets=t.int()), ValueError, "targets must be int64"),
        (dict(targets=torch.tensor([0, 1, 5, -100])), ValueError, r"targets\[2\] = 5 is outside \[0, V = 5\)"),
        (dict(targets=torch.tensor([0, -1, 2, 3])), ValueError, r"targets\[1\] = -1 is outside"),
        (dict(x=x.double(), weight=w.double()), ValueError, "x has dtype torch.float64; supported"),
        (dict(weight=w.half()), ValueError, "weight has dtype torch.float16 but x has torch.float32"),
        (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(V,\) = \(5,\)"),
        (dict(bias=torch.randn(5).half()), ValueError, "bias has dtype torch.float16"),
        (dict(bias=[0.0] * 5), TypeError, "bias must be None or a torch.Tensor"),
        (dict(reduction="avg"), ValueError, "reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(backend="cuda"), ValueError, "backend must be None or one of 'chunked', 'triton', 'reference'"),
    ]


@pytest.mark.parametrize("change, error, message", _bad_calls(), ids=[m[:30] for _, _, m in _bad_calls()])
def test_bad_inputs_name_the_argument(change, error, message):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(5, 8), targets=torch.tensor([0, 1, 4, -100]))
    args.update(change)
    with pytest.raises(error, match=message):
        linear_cross_entropy(**args)


def test_ignore_index_may_be_out_of_range_and_matches_f_cross_entropy():
    """A target equal to a custom ignore_index (here -1) is skipped, not an error."""
    x, weight, _, targets = _inputs(9, 8, 5, torch.float32)
    targets[::2] = -1
    got = linear_cross_entropy(x, weight, targets, ignore_index=-1, reduction="none")
    want = F.cross_entropy(F.linear(x, weight), targets, ignore_index=-1, reduction="none")
    assert _max_err(got, want) < 1e-6 and bool((got[::2] == 0).all())


# --------------------------------------------------------------------------------------------
# GPU only: compiled kernel on realistic widths, the fp32 weight-gradient accumulation, peak memory


@pytest.mark.skipif(not CUDA, reason="needs a GPU: compiled kernel with several 8192-column blocks per row")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_wide_vocabulary(dtype, reduction):
    _against_float64(300, 64, 20_000, dtype, reduction, "triton", bias=dtype == torch.float16, ignore_every=9,
                     seed=3)


@pytest.mark.skipif(not CUDA, reason="needs a GPU: peak memory from the CUDA caching allocator")
def test_cuda_peak_memory_is_below_the_logits():
    n, c, v = 16384, 128, 32_000  # 16 chunks of 1024 rows
    x, weight, _, targets = _inputs(n, c, v, torch.bfloat16)
    x.requires_grad_()
    weight.requires_grad_()
    linear_cross_entropy(x, weight, targets).backward()  # warm-up: kernel compiled, cuBLAS workspace allocated
    x.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(x, weight, targets).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # grad_weight in fp32 while it accumulates (v * c * 4) and one block of its bf16 copy, grad_x,
    # one chunk of logits, 16 MiB of slack (small tensors, allocator rounding); the bf16 logits
    # alone would be n * v * 2
    rows = lce._chunk_rows(n, c, v, 2, "cuda")
    bound = v * c * 4 + v * c * 2 // lce._WEIGHT_GRAD_BLOCKS + n * c * 2 + rows * v * 2 + (16 << 20)
    assert extra <= bound < n * v * 2 // 4, (extra, bound)


def test_fp16_gradients_take_the_loss_scale_before_rounding():
    """Under fp16 loss scaling d loss / d logits (softmax / N ~ 2e-7 here, below fp16's smallest
    normal 6e-5) must be multiplied by the scale before it is rounded to fp16, as autograd through
    the fp32 reference does. Computed unscaled in the forward and multiplied afterwards it lost
    to subnormal rounding: relative error of grad_x 9e-3 (grad_weight 5e-3) against 3e-4 now.
    The logic is the autograd Function's, shared by the Triton path."""
    backend = "chunked"
    gen = torch.Generator().manual_seed(0)
    n, c, v = 1024, 16, 4097
    x = (torch.randn(n, c, generator=gen) * 0.1).half()
    w = (torch.randn(v, c, generator=gen) * 0.1).half()
    targets = torch.randint(0, v, (n,), generator=gen)
    scale = 2.0 ** 16
    exact = {}
    for name, fn, args in (("ref", linear_cross_entropy_ref, (x.double(), w.double())), ("got", None, (x, w))):
        xi, wi = (t.clone().requires_grad_() for t in args)
        loss = linear_cross_entropy(xi, wi, targets, backend=backend) if fn is None else fn(xi, wi, targets)
        (loss * scale).backward()
        exact[name] = (xi.grad.double(), wi.grad.double())
    for got, ref in zip(exact["got"], exact["ref"]):
        rel = float((got - ref).norm() / ref.norm())
        assert rel < 2e-3, rel
