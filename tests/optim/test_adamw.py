"""px.optim.AdamW against torch.optim.AdamW: trajectories, state dicts, master weights, errors."""

from __future__ import annotations

import copy

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


def _make_params(seed: int, device: str = "cpu", dtype=torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in SHAPES]


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
            p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
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
def test_matches_torch_adamw_on_cuda():
    assert px.ops.backend("adamw", "cuda") == "cuda", _extension.build_info()
    ours, theirs = _make_params(0, "cuda"), _make_params(0, "cuda")
    _train(px.optim.AdamW, ours, 25)
    _train(torch.optim.AdamW, theirs, 25, foreach=False)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, atol=1e-6, name=f"param {i}")


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
