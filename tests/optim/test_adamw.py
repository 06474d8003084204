"""px.optim.AdamW against torch.optim.AdamW: trajectories, state dicts, master weights, errors."""

from __future__ import annotations

import copy
import io
from collections import defaultdict

import pytest
import torch

import parallax as px
from parallax import _extension
from parallax.ops import adamw as adamw_op
from tests.helpers import assert_close

SHAPES = [(1,), (7,), (97, 13), (1025,), (3, 5, 7)]
ISAS = ["avx512", "avx2", "scalar"]


def _isa_supported(isa: str) -> bool:
    order = {"scalar": 0, "avx2": 1, "avx512": 2}
    detected = _extension.build_info().get("detected_cpu_isa")
    return detected is not None and order[isa] <= order[detected]


@pytest.fixture(params=ISAS + ["reference"])
def cpu_path(request, monkeypatch):
    """Run the test on each C++ SIMD path this CPU has, and on the plain-PyTorch path."""
    path = request.param
    if path == "reference":
        monkeypatch.setattr(adamw_op, "backend", lambda device="cpu": "reference")
        yield path
        return
    if not _extension.has_kernel("adamw_", "cpu"):
        pytest.skip(f"parallax._C not loaded: {_extension.load_error()}")
    if not _isa_supported(path):
        pytest.skip(f"this CPU does not support {path}")
    previous = _extension.cpu_isa()
    _extension.set_cpu_isa(path)
    yield path
    _extension.set_cpu_isa(previous)


def _randn(shape, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Normal values drawn in ``dtype`` when it is fp64 or complex (every bit random), else drawn in fp32 and cast."""
    draw = dtype if dtype == torch.float64 or dtype.is_complex else torch.float32
    return torch.randn(shape, generator=gen, dtype=draw).to(dtype)


def _make_params(seed: int, device: str = "cpu", dtype=torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(_randn(s, gen, dtype).to(device)) for s in SHAPES]


def _groups(params, **extra):
    # Two groups with different lr and weight decay, as a real model's decay/no-decay split.
    return [
        {"params": params[:3], "lr": 3e-3, "weight_decay": 0.1, **extra},
        {"params": params[3:], "lr": 1e-3, "weight_decay": 0.0, **extra},
    ]


def _train(opt_cls, params, steps: int, *, seed: int = 1, start: int = 0, opt=None, sched=None, **kwargs):
    """Run `steps` steps with fresh random gradients (step-indexed, so runs can be split and resumed)."""
    opt = opt or opt_cls(_groups(params), betas=(0.9, 0.95), eps=1e-8, **kwargs)
    sched = sched or torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(seed * 100_003 + step)
        for p in params:
            p.grad = _randn(p.shape, gen, p.dtype).to(p.device)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return opt, sched


@pytest.mark.parametrize("maximize", [False, True])
def test_matches_torch_adamw_for_25_steps(cpu_path, maximize):
    ours, theirs = _make_params(0), _make_params(0)
    _train(px.optim.AdamW, ours, 25, maximize=maximize)
    _train(torch.optim.AdamW, theirs, 25, maximize=maximize)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, atol=1e-6, name=f"param {i} {tuple(a.shape)}")
    assert all(p.grad is None for p in ours), "zero_grad(set_to_none=True) must drop gradients"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.float64])
def test_matches_torch_adamw_on_cuda(dtype):
    assert px.ops.backend("adamw", "cuda") == "cuda", _extension.build_info()
    ours, theirs = _make_params(0, "cuda", dtype), _make_params(0, "cuda", dtype)
    _train(px.optim.AdamW, ours, 25)
    _train(torch.optim.AdamW, theirs, 25, foreach=False)
    tol = dict(atol=0.0, rtol=1e-15) if dtype == torch.float64 else dict(atol=1e-6)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if dtype.is_complex:
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        assert_close(a, b, **tol, name=f"param {i}")


def test_uses_the_compiled_kernel_on_cpu():
    if not _extension.available():
        pytest.skip(f"parallax._C not loaded: {_extension.load_error()}")
    assert px.ops.backend("adamw", "cpu") == "cpp"


@pytest.mark.parametrize("direction", ["torch_to_parallax", "parallax_to_torch"])
def test_state_dict_moves_between_torch_and_parallax(direction):
    first, second = (torch.optim.AdamW, px.optim.AdamW)
    if direction == "parallax_to_torch":
        first, second = second, first
    reference = _make_params(0)
    _train(torch.optim.AdamW, reference, 20)

    params = _make_params(0)
    opt, sched = _train(first, params, 10)
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), sched.state_dict()
    # The usual resume order: build optimizer and scheduler, then load both states.
    new_opt = second(_groups(params), betas=(0.9, 0.95))
    new_sched = torch.optim.lr_scheduler.LambdaLR(new_opt, lambda s: 1.0 / (1 + 0.1 * s))
    new_opt.load_state_dict(saved_opt)
    new_sched.load_state_dict(saved_sched)
    assert set(new_opt.state[params[0]]) >= {"step", "exp_avg", "exp_avg_sq"}
    _train(second, params, 10, start=10, opt=new_opt, sched=new_sched)
    for i, (a, b) in enumerate(zip(params, reference)):
        assert_close(a, b, atol=1e-6, name=f"param {i}")
    if direction == "parallax_to_torch":
        assert new_opt.param_groups[0]["decoupled_weight_decay"], "torch would load it as L2-regularised Adam"


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_master_weights_match_fp32_adamw_then_cast(cpu_path, low):
    fp32 = _make_params(0)
    mixed = [torch.nn.Parameter(p.detach().to(low)) for p in fp32]
    with torch.no_grad():  # both start from the same (low-precision-representable) weights
        for a, b in zip(fp32, mixed):
            a.copy_(b.float())
    opt32 = torch.optim.AdamW(_groups(fp32))
    opt_mixed = px.optim.AdamW(_groups(mixed), master_weights=True)
    for step in range(10):
        gen = torch.Generator().manual_seed(step)
        for a, b in zip(fp32, mixed):
            g = torch.randn(a.shape, generator=gen).to(low)
            b.grad = g
            a.grad = g.float()
        opt32.step()
        opt_mixed.step()
    for i, (a, b) in enumerate(zip(fp32, mixed)):
        state = opt_mixed.state[b]
        assert state["master_param"].dtype == torch.float32
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
        assert_close(state["master_param"], a, atol=1e-6, name=f"master {i}")
        assert torch.equal(b.detach(), state["master_param"].to(low)), f"param {i} is not the rounded master"


def test_master_weights_survive_a_state_dict_round_trip():
    params = [torch.nn.Parameter(torch.randn(97, 13).bfloat16())]
    opt = px.optim.AdamW(params, master_weights=True)
    params[0].grad = torch.randn(97, 13).bfloat16()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    fresh = px.optim.AdamW(params, master_weights=True)
    fresh.load_state_dict(saved)
    for key in ("master_param", "exp_avg", "exp_avg_sq"):
        got = fresh.state[params[0]][key]
        assert got.dtype == torch.float32, f"{key} was cast to {got.dtype}"
        assert torch.equal(got, opt.state[params[0]][key]), key


def test_low_precision_params_without_master_weights_follow_torch():
    ours = [torch.nn.Parameter(torch.randn(1025).bfloat16())]
    theirs = [torch.nn.Parameter(ours[0].detach().clone())]
    o1, o2 = px.optim.AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    for step in range(5):
        g = torch.randn(1025, generator=torch.Generator().manual_seed(step)).bfloat16()
        ours[0].grad, theirs[0].grad = g, g.clone()
        o1.step()
        o2.step()
    assert o1.state[ours[0]]["exp_avg"].dtype == torch.bfloat16
    # torch rounds to bf16 after every op, we after the whole update: allow a few bf16 ulps.
    assert_close(ours[0], theirs[0], atol=1e-2, rtol=2e-2)


def test_non_contiguous_parameter_is_updated_correctly():
    ours = [torch.nn.Parameter(torch.randn(13, 7).t())]
    theirs = [torch.nn.Parameter(ours[0].detach().clone())]
    assert not ours[0].is_contiguous()
    o1, o2 = px.optim.AdamW(ours), torch.optim.AdamW(theirs)
    for _ in range(3):
        g = torch.randn(7, 13)
        ours[0].grad, theirs[0].grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert_close(ours[0], theirs[0], atol=1e-6)


def test_parameters_without_grad_are_left_alone():
    params = _make_params(0)
    before = [p.detach().clone() for p in params]
    opt = px.optim.AdamW(params)
    params[1].grad = torch.ones_like(params[1])
    opt.step()
    assert not torch.equal(params[1], before[1])
    for i in (0, 2, 3, 4):
        assert torch.equal(params[i], before[i]) and params[i] not in opt.state


@pytest.mark.parametrize("option", ["amsgrad", "capturable", "differentiable"])
def test_unsupported_options_raise(option):
    with pytest.raises(NotImplementedError, match=option):
        px.optim.AdamW(_make_params(0), **{option: True})


@pytest.mark.parametrize(
    "kwargs, field",
    [({"lr": -1.0}, "lr"), ({"eps": -1e-8}, "eps"), ({"betas": (0.9, 1.0)}, "betas"), ({"weight_decay": -0.1}, "weight_decay")],
)
def test_bad_hyperparameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        px.optim.AdamW(_make_params(0), **kwargs)


def test_sparse_gradients_are_rejected():
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        px.optim.AdamW([p]).step()


def test_closure_is_evaluated_with_grad_enabled():
    p = torch.nn.Parameter(torch.randn(3))
    opt = px.optim.AdamW([p])

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure) is not None and opt.state[p]["step"].item() == 1


# ---------------------------------------------------------------- every parameter torch's takes


def _assert_state_matches(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, params_ours, params_theirs,
                          **tol) -> None:
    """Same set of entries, same step counts, moments equal element-wise (complex ones as real views)."""
    assert len(ours.state) == len(theirs.state), f"{len(ours.state)} state entries, torch has {len(theirs.state)}"
    for i, (a, b) in enumerate(zip(params_ours, params_theirs)):
        mine, ref = ours.state[a], theirs.state[b]
        steps = float(mine["step"]), float(ref["step"])
        assert steps[0] == steps[1], f"param {i}: step {steps[0]} vs torch's {steps[1]}"
        for key in ("exp_avg", "exp_avg_sq"):
            assert mine[key].dtype == ref[key].dtype, f"param {i} {key}: {mine[key].dtype} vs torch's {ref[key].dtype}"
            got, want = mine[key], ref[key]
            if got.is_complex():
                got, want = torch.view_as_real(got), torch.view_as_real(want)
            assert_close(got, want, **tol, name=f"param {i} {key}")


def test_complex64_params_match_torch_adamw(cpu_path):
    # torch steps a complex parameter as its real view: the imaginary part trains too.
    ours, theirs = _make_params(0, dtype=torch.complex64), _make_params(0, dtype=torch.complex64)
    opt, _ = _train(px.optim.AdamW, ours, 25)
    ref, _ = _train(torch.optim.AdamW, theirs, 25)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(torch.view_as_real(a), torch.view_as_real(b), atol=1e-6, name=f"param {i} {tuple(a.shape)}")
    _assert_state_matches(opt, ref, ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=["float64", "complex128"])
def test_fp64_params_match_torch_adamw_in_fp64(dtype):
    ours, theirs = _make_params(0, dtype=dtype), _make_params(0, dtype=dtype)
    opt, _ = _train(px.optim.AdamW, ours, 25)
    ref, _ = _train(torch.optim.AdamW, theirs, 25)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if dtype.is_complex:
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        assert_close(a, b, atol=0.0, rtol=1e-15, name=f"param {i} {tuple(a.shape)}")
    _assert_state_matches(opt, ref, ours, theirs, atol=0.0, rtol=1e-15)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_fp64_zero_gradient_step_keeps_what_fp32_cannot_hold(weight_decay):
    start = torch.full((7,), 1 + 1e-12, dtype=torch.float64)  # 1 + 1e-12 rounds to 1.0 in fp32
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    for p, cls in ((ours, px.optim.AdamW), (theirs, torch.optim.AdamW)):
        p.grad = torch.zeros_like(p)
        cls([p], weight_decay=weight_decay).step()
    assert torch.equal(ours, theirs), f"{ours[0].item()!r} vs torch's {theirs[0].item()!r}"
    if weight_decay == 0.0:
        assert torch.equal(ours, start), f"a zero-gradient step moved {start[0].item()!r} to {ours[0].item()!r}"


def _donor_state() -> dict:
    """Another optimizer's state for parameters shaped like ours (torch's AdamW, 3 steps in)."""
    donor = _make_params(7)
    opt, _ = _train(torch.optim.AdamW, donor, 3, seed=2)
    return copy.deepcopy(opt.state_dict()["state"])


def _clear(opt, params) -> None:
    opt.state.clear()


def _replace(opt, params) -> None:
    opt.state = defaultdict(dict)


def _assign_entries_as_zero_redundancy_load_does(opt, params) -> None:
    # torch.distributed.optim.ZeroRedundancyOptimizer.load_state_dict: state[param] = a copy of the saved entry
    for index, entry in _donor_state().items():
        opt.state[params[index]] = {key: value.clone() for key, value in entry.items()}


def _reset_tensors_in_entries(opt, params) -> None:
    # the usual "move/reset the optimizer state" loop: new tensors in the existing entries
    for entry in opt.state.values():
        entry["step"] = torch.tensor(0.0)
        entry["exp_avg"] = torch.zeros_like(entry["exp_avg"])
        entry["exp_avg_sq"] = torch.zeros_like(entry["exp_avg_sq"])


def _rewind_steps_in_place(opt, params) -> None:
    for entry in opt.state.values():
        entry["step"].fill_(2.0)


@pytest.mark.parametrize("mutate", [_clear, _replace, _assign_entries_as_zero_redundancy_load_does,
                                    _reset_tensors_in_entries, _rewind_steps_in_place])
def test_changes_to_state_from_outside_take_effect_as_in_torch(mutate):
    ours, theirs = _make_params(0), _make_params(0)
    runs = []
    for cls, params in ((px.optim.AdamW, ours), (torch.optim.AdamW, theirs)):
        opt, sched = _train(cls, params, 12)
        mutate(opt, params)
        _train(cls, params, 12, start=12, opt=opt, sched=sched)
        runs.append(opt)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, atol=1e-6, name=f"param {i} {tuple(a.shape)}")
    _assert_state_matches(*runs, ours, theirs, atol=1e-6, rtol=1e-5)


def test_checkpoint_saved_after_state_clear_holds_the_new_state():
    ours, theirs = _make_params(0), _make_params(0)
    saved = []
    for cls, params in ((px.optim.AdamW, ours), (torch.optim.AdamW, theirs)):
        opt, sched = _train(cls, params, 5)
        opt.state.clear()
        _train(cls, params, 1, start=5, opt=opt, sched=sched)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        saved.append(torch.load(buffer)["state"])
    mine, ref = saved
    assert sorted(mine) == sorted(ref) == list(range(len(ours))), f"checkpoint holds state for {sorted(mine)}"
    for i in ref:
        assert float(mine[i]["step"]) == float(ref[i]["step"]) == 1.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(mine[i][key], ref[i][key], atol=1e-7, rtol=1e-6, name=f"param {i} {key}")


def test_zero_redundancy_optimizer_load_state_dict_mid_run_matches_torch():
    """ZeroRedundancyOptimizer(optimizer_class=px.optim.AdamW) on a gloo rank: save, step on, load, step on."""
    from tests.distributed.launch import run_ranks
    from tests.optim import adamw_workers

    results = run_ranks(adamw_workers.zero_redundancy_save_step_load, 1)
    expected = adamw_workers.torch_save_step_load()
    for rank, params in enumerate(results):
        for i, (a, b) in enumerate(zip(params, expected)):
            assert_close(a, b, atol=1e-6, name=f"rank {rank} param {i}")


def _add_group_later(cls, params, steps):
    opt = cls(params[:3], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    _train(cls, params[:3], 5, opt=opt)
    opt.add_param_group({"params": params[3:], "lr": 5e-3, "weight_decay": 0.0})
    _train(cls, params, steps - 5, start=5, opt=opt)
    return opt


@pytest.mark.parametrize(
    "case, dtype, kwargs",
    [
        pytest.param("tensor lr", torch.float32, dict(lr=torch.tensor(1e-2)), id="tensor-lr-fp32"),
        pytest.param("tensor lr", torch.float64, dict(lr=torch.tensor(1e-2)), id="fp32-tensor-lr-fp64"),
        pytest.param("tensor lr", torch.float64, dict(lr=torch.tensor(1e-2, dtype=torch.float64)), id="tensor-lr-fp64"),
        pytest.param("no weight decay", torch.float32, dict(weight_decay=0.0), id="no-weight-decay"),
        pytest.param("maximize", torch.float64, dict(maximize=True, weight_decay=0.0), id="maximize-fp64"),
        pytest.param("foreach", torch.float32, dict(foreach=True), id="foreach"),
        pytest.param("fused", torch.float32, dict(fused=True), id="fused"),
        pytest.param("group added later", torch.float32, None, id="add-param-group-fp32"),
        pytest.param("group added later", torch.float64, None, id="add-param-group-fp64"),
    ],
)
def test_torch_optimizer_cases_match_torch_adamw(case, dtype, kwargs):
    ours, theirs = _make_params(0, dtype=dtype), _make_params(0, dtype=dtype)
    runs = []
    for cls, params in ((px.optim.AdamW, ours), (torch.optim.AdamW, theirs)):
        if kwargs is None:
            runs.append(_add_group_later(cls, params, 20))
        else:
            runs.append(_train(cls, params, 20, **kwargs)[0])
    tol = dict(atol=1e-6) if dtype == torch.float32 else dict(atol=0.0, rtol=1e-15)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, **tol, name=f"{case}: param {i}")
    _assert_state_matches(*runs, ours, theirs, **(tol if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)))


def test_empty_params_and_params_without_grad_step_like_torch():
    runs, finals = [], []
    for cls in (px.optim.AdamW, torch.optim.AdamW):
        params = [torch.nn.Parameter(torch.randn(0)), torch.nn.Parameter(torch.ones(7)),
                  torch.nn.Parameter(torch.ones(3, 0)), torch.nn.Parameter(torch.ones(5))]
        opt = cls(params, lr=1e-2)
        for step in range(4):
            for i, p in enumerate(params):  # the last parameter has a gradient on even steps only
                p.grad = None if i == 3 and step % 2 else torch.full_like(p, 0.5 + step)
            opt.step()
        runs.append(opt)
        finals.append(params)
    for i, (a, b) in enumerate(zip(*finals)):
        assert_close(a, b, atol=1e-6, name=f"param {i} {tuple(a.shape)}")
    _assert_state_matches(*runs, *finals, atol=1e-6, rtol=1e-5)


def test_step_dtype_follows_torch_under_an_fp64_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dtypes = []
        for cls in (px.optim.AdamW, torch.optim.AdamW):
            p = torch.nn.Parameter(torch.randn(5))
            p.grad = torch.randn(5)
            opt = cls([p])
            opt.step()
            dtypes.append(opt.state[p]["step"].dtype)
    finally:
        torch.set_default_dtype(previous)
    assert dtypes[0] == dtypes[1], f"state['step'] is {dtypes[0]}, torch's {dtypes[1]}"
