"""px.amp.LossScaler in one process: the scale schedule, min-scale errors, state, real training."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import parallax as px
from parallax.amp import LossScaleError, LossScaler
from parallax.amp import loss_scaler as loss_scaler_module
from parallax.ops import unscale_ref


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


def _overflowing_step(scaler: LossScaler, model: nn.Module, opt, overflow: bool, bad: str = "fc.bias"):
    """One GradScaler-style iteration with fake gradients; ``bad`` gets an inf when ``overflow``.
    Returns what ``step`` returned; the update runs unless step raised."""
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, 0.5 * scaler.get_scale())
        if overflow and name == bad:
            p.grad.view(-1)[1] = float("inf")
    result = scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return result


def _driver(**config):
    torch.manual_seed(0)
    model = Net()
    return LossScaler(model=model, **config), model, torch.optim.SGD(model.parameters(), lr=0.1)


def _run(pattern, **config) -> list[float]:
    scaler, model, opt = _driver(**config)
    scales = []
    for overflow in pattern:
        _overflowing_step(scaler, model, opt, overflow)
        scales.append(scaler.get_scale())
    return scales


def test_usage_is_gradscalers_and_it_is_enabled():
    scaler = LossScaler(init_scale=8.0)
    assert scaler.is_enabled() and scaler.get_scale() == 8.0
    loss = torch.tensor(1.5, requires_grad=True)
    assert scaler.scale(loss).item() == 12.0
    assert [t.item() for t in scaler.scale([loss, (loss,)])[1]] == [12.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_loss_is_scaled_in_fp32(dtype):
    """As GradScaler and DeepSpeed: in fp16, 5.5 times the default scale 2**16 is inf (max 65504)."""
    loss = torch.tensor(5.5, dtype=dtype, requires_grad=True)
    scaled = LossScaler().scale(loss)
    assert scaled.dtype == torch.float32 and scaled.item() == 5.5 * 2.0**16
    assert LossScaler().scale(torch.tensor(5.5, dtype=torch.float64)).dtype == torch.float64


def test_backoff_waits_for_hysteresis_overflows_then_every_overflow_backs_off():
    scales = _run([True, True, True, True], init_scale=1024.0, hysteresis=3)
    assert scales == [1024.0, 1024.0, 512.0, 256.0]
    # Clean steps in between do not restore the allowance; only a growth does (DeepSpeed's rule).
    assert _run([True, False, True], init_scale=1024.0, hysteresis=2) == [1024.0, 1024.0, 512.0]
    # hysteresis=1 is GradScaler's schedule: every overflow halves the scale.
    assert _run([True, True], init_scale=1024.0, hysteresis=1) == [512.0, 256.0]


def test_growth_after_growth_interval_clean_steps_and_an_overflow_restarts_the_count():
    scales = _run([False] * 3 + [False, True, False, False, False], init_scale=4.0, growth_interval=3,
                  growth_factor=3.0, hysteresis=5)
    assert scales == [4.0, 4.0, 12.0, 12.0, 12.0, 12.0, 12.0, 36.0]


def test_hysteresis_counter_resets_on_growth():
    pattern = [True, False, False, True, True]
    scales = _run(pattern, init_scale=64.0, growth_interval=2, hysteresis=2)
    # The first overflow uses one of two allowed; the growth restores both, so the next single
    # overflow does not back off, and the one after it does.
    assert scales == [64.0, 64.0, 128.0, 128.0, 64.0]


def test_at_min_scale_steps_keep_being_skipped_then_an_error_names_the_bad_parameters():
    scaler, model, opt = _driver(init_scale=4.0, min_scale=1.0, hysteresis=1, max_consecutive_skips=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = [_overflowing_step(scaler, model, opt, True, bad="out.weight") for _ in range(3)]
    assert results == [None, None, None] and scaler.get_scale() == 1.0, "skips at min_scale must not raise yet"
    assert scaler.state_dict()["_consecutive_skips"] == 3
    with pytest.raises(LossScaleError, match=r"4 steps in a row .* minimum loss scale 1; non-finite gradients in: "
                                             r"out\.weight\.") as info:
        _overflowing_step(scaler, model, opt, True, bad="out.weight")
    assert info.value.parameters == ["out.weight"] and info.value.skips == 4 and info.value.scale == 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on a skipped step"


def test_a_clean_step_resets_the_consecutive_skips():
    scaler, model, opt = _driver(init_scale=2.0, min_scale=1.0, hysteresis=1, max_consecutive_skips=3)
    for overflow in [True, True, False, True, True]:  # 2 skips, clean, 2 skips: never 3 in a row
        _overflowing_step(scaler, model, opt, overflow)
    with pytest.raises(LossScaleError):
        _overflowing_step(scaler, model, opt, True)


def test_max_consecutive_skips_one_raises_at_the_first_skip_at_min_scale_and_none_never_raises():
    scaler, model, opt = _driver(init_scale=2.0, min_scale=1.0, hysteresis=1, max_consecutive_skips=1)
    _overflowing_step(scaler, model, opt, True)  # 2 -> 1: the loss was scaled by 2, not yet the minimum
    with pytest.raises(LossScaleError, match="fc.bias"):
        _overflowing_step(scaler, model, opt, True)
    scaler, model, opt = _driver(init_scale=1.0, min_scale=1.0, hysteresis=1, max_consecutive_skips=None)
    for _ in range(30):
        assert _overflowing_step(scaler, model, opt, True) is None
    assert scaler.get_scale() == 1.0


def test_parameter_names_come_from_the_model_the_param_groups_or_indices():
    net = Net()
    for opt, scaler, expected in [
        (torch.optim.SGD(net.named_parameters(), lr=0.1), LossScaler(init_scale=1.0, max_consecutive_skips=1),
         "out.bias"),
        (torch.optim.SGD([{"params": [net.fc.weight]}, {"params": [net.out.weight, net.out.bias]}], lr=0.1),
         LossScaler(init_scale=1.0, max_consecutive_skips=1), "param_groups[1][1]"),
    ]:
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        net.out.bias.grad[0] = float("nan")
        with pytest.raises(LossScaleError) as info:
            scaler.step(opt)
        assert info.value.parameters == [expected]


def test_names_are_taken_before_clipping_smears_nan_over_every_gradient():
    scaler, model, opt = _driver(init_scale=1.0, min_scale=1.0, max_consecutive_skips=1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.fc.weight.grad[0, 0] = float("nan")
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # NaN norm: every gradient becomes NaN
    assert all(p.grad.isnan().all() for p in model.parameters())
    with pytest.raises(LossScaleError) as info:
        scaler.step(opt)
    assert info.value.parameters == ["fc.weight"]


def _random_steps(scaler, model, opt, pattern):
    return [(_overflowing_step(scaler, model, opt, o), scaler.get_scale())[1] for o in pattern]


def test_state_dict_round_trips_every_counter():
    config = {"init_scale": 256.0, "growth_interval": 3, "hysteresis": 3, "min_scale": 2.0,
              "max_consecutive_skips": 50, "growth_factor": 4.0, "backoff_factor": 0.25}
    scaler, model, opt = _driver(**config)
    _random_steps(scaler, model, opt, [True, False, False, True, True])
    state = scaler.state_dict()
    assert state == {"scale": 64.0, "growth_factor": 4.0, "backoff_factor": 0.25, "growth_interval": 3,
                     "_growth_tracker": 0, "hysteresis": 3, "_hysteresis_tracker": 0, "min_scale": 2.0,
                     "max_consecutive_skips": 50, "_consecutive_skips": 2}
    restored, model2, opt2 = _driver()  # default config: everything must come from the state dict
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    rest = [False, True, False, False, False, True, True, True, True, False]
    assert _random_steps(restored, model2, opt2, rest) == _random_steps(scaler, model, opt, rest)


def test_state_dicts_load_both_ways_with_torch_gradscaler():
    theirs = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    ours = LossScaler()
    ours.load_state_dict(theirs.state_dict())
    assert ours.get_scale() == 512.0 and ours.growth_interval == 7 and ours.state_dict()["_hysteresis_tracker"] == 2
    back = torch.amp.GradScaler("cpu")
    back.load_state_dict(LossScaler(init_scale=32.0, growth_interval=9).state_dict())
    assert back.get_scale() == 32.0 and back.get_growth_interval() == 9
    with pytest.raises(RuntimeError, match="empty"):
        ours.load_state_dict({})
    with pytest.raises(ValueError, match="below min_scale"):
        ours.load_state_dict({"scale": 0.5})


def test_training_with_adamw_skips_the_overflowing_step_and_otherwise_equals_unscaled_training():
    """A real loop: the step with an injected inf leaves parameters and optimizer state untouched,
    and every other step equals plain fp32 training exactly (power-of-two scales are exact)."""
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    data = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for g in gens]
    torch.manual_seed(0)
    model = Net()
    reference = Net()
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    scaler = LossScaler(init_scale=2.0**12, model=model)
    for step, (x, y) in enumerate(data):
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if step == 3:
            model.out.weight.grad[1, 2] = float("inf")
            before = {k: v.clone() for k, v in model.state_dict().items()}
            state_steps = [float(s["step"]) for s in opt.state.values()]
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        result = scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 3:
            assert result is None
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k]), f"{k} changed on the skipped step"
            assert [float(s["step"]) for s in opt.state.values()] == state_steps, "optimizer state advanced"
            assert scaler.get_scale() == 2.0**12, "hysteresis=2: one overflow does not back off"
            continue
        nn.functional.cross_entropy(reference(x), y).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 10.0)
        ref_opt.step()
        ref_opt.zero_grad()
        for (k, v), r in zip(model.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(v, r), f"step {step}: {k} differs from unscaled training"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_are_unscaled_in_place(dtype):
    model = Net().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=2.0**10)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape) * 2.0**10).to(dtype)
    expected = [p.grad.clone() for p in model.parameters()]
    unscale_ref(expected, torch.zeros(1), 2.0**-10)
    scaler.unscale_(opt)
    for p, e in zip(model.parameters(), expected):
        assert p.grad.dtype == dtype and torch.equal(p.grad, e)


def test_sparse_gradients_are_unscaled():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    scaler = LossScaler(init_scale=4.0)
    scaler.scale(emb(torch.tensor([1, 2, 2])).sum()).backward()
    scaler.step(opt)
    assert torch.equal(emb.weight.grad.to_dense()[2], torch.full((3,), 2.0))


def test_unscale_is_one_fused_call_per_device(monkeypatch):
    calls = []
    real = loss_scaler_module.fused_unscale_
    monkeypatch.setattr(loss_scaler_module, "fused_unscale_", lambda g, f, s: (calls.append(len(g)), real(g, f, s)))
    model = Net()
    opt = torch.optim.SGD([{"params": [model.fc.weight, model.fc.bias]}, {"params": model.out.parameters()}], lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    LossScaler().unscale_(opt)
    assert calls == [4], "all gradients of all param groups must go to the fused op in one call"


def test_an_optimizer_can_run_the_scaler_inside_its_own_step():
    """The hook for optimizers that own their scaler (as ZeroOptimizer may for fp16)."""
    model = Net()
    scaler = LossScaler(init_scale=16.0, hysteresis=1)

    class ScaledSGD(torch.optim.SGD):
        def step(self, closure=None):
            if scaler.should_skip_step(self):
                return None
            return super().step(closure)

    opt = ScaledSGD(model.parameters(), lr=0.1)
    for overflow in (False, True):
        for p in model.parameters():
            p.grad = torch.full_like(p, 16.0)
        model.fc.bias.grad[0] = float("inf") if overflow else 16.0
        before = [p.clone() for p in model.parameters()]
        opt.step()
        scaler.update()
        changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
        assert changed == [not overflow] * 4
    assert scaler.get_scale() == 8.0


def test_misuse_raises_like_gradscaler():
    scaler, model, opt = _driver()
    with pytest.raises(RuntimeError, match="No inf checks"):
        scaler.update()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(opt)
    scaler.update(new_scale=3.0)
    assert scaler.get_scale() == 3.0
    with pytest.raises(TypeError, match="tensor"):
        scaler.scale(1.0)


@pytest.mark.parametrize("field, value, message", [
    ("init_scale", 0.0, "init_scale must be a positive finite number"),
    ("growth_factor", 1.0, "growth_factor must be a number > 1"),
    ("backoff_factor", 1.0, "backoff_factor must be a number in \\(0, 1\\)"),
    ("growth_interval", 0, "growth_interval must be a positive integer"),
    ("hysteresis", 1.5, "hysteresis must be a positive integer"),
    ("min_scale", 2.0**17, "min_scale must be <= init_scale"),
    ("max_consecutive_skips", 0, "max_consecutive_skips must be a positive integer"),
])
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        LossScaler(**{field: value})


def _reference_schedule(pattern, init_scale, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale,
                        max_skips):
    """DeepSpeed's DynamicLossScaler.update_scale (delayed_shift = hysteresis, consecutive_hysteresis
    off) with a floor at min_scale and, instead of its exit, an error after max_skips skips in a
    row when at min_scale. Returns the scale after each step, and the step that raises (or None)."""
    scale, cur_hysteresis, last_overflow, skips, scales = init_scale, hysteresis, -1, 0, []
    for it, overflow in enumerate(pattern):
        if overflow:
            if max_skips is not None and scale <= min_scale and skips + 1 >= max_skips:
                return scales, it
            skips += 1
            if hysteresis == 1 or cur_hysteresis == 1:
                scale = max(scale * backoff_factor, min_scale)
            else:
                cur_hysteresis -= 1
            last_overflow = it
        else:
            skips = 0
            if (it - last_overflow) % growth_interval == 0:
                cur_hysteresis = hysteresis
                if math.isfinite(scale * growth_factor):
                    scale *= growth_factor
        scales.append(scale)
    return scales, None


@settings(max_examples=60, deadline=None)
@given(
    pattern=st.lists(st.booleans(), min_size=1, max_size=60),
    init_exp=st.integers(0, 20),
    growth_factor=st.sampled_from([2.0, 3.0, 1.5]),
    backoff_factor=st.sampled_from([0.5, 0.25, 0.7]),
    growth_interval=st.integers(1, 5),
    hysteresis=st.integers(1, 4),
    min_exp=st.integers(-2, 3),
    max_skips=st.none() | st.integers(1, 8),
)
def test_scale_trajectory_matches_a_hand_written_reference(pattern, init_exp, growth_factor, backoff_factor,
                                                           growth_interval, hysteresis, min_exp, max_skips):
    schedule = {"init_scale": 2.0**init_exp, "growth_factor": growth_factor, "backoff_factor": backoff_factor,
                "growth_interval": growth_interval, "hysteresis": hysteresis,
                "min_scale": min(2.0**min_exp, 2.0**init_exp)}
    expected, raising_step = _reference_schedule(pattern, **schedule, max_skips=max_skips)
    config = {**schedule, "max_consecutive_skips": max_skips}
    scaler, model, opt = _driver(**config)
    scales = []
    for it, overflow in enumerate(pattern):
        params = [p.clone() for p in model.parameters()]
        try:
            result = _overflowing_step(scaler, model, opt, overflow)
        except LossScaleError:
            assert it == raising_step, f"raised at step {it}, the reference at {raising_step}"
            break
        skipped = all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
        assert skipped == overflow, f"step {it}: overflow={overflow} but skipped={skipped}"
        assert result is None or not overflow
        scales.append(scaler.get_scale())
    else:
        assert raising_step is None, f"the reference raises at step {raising_step}"
    assert scales == expected


def test_public_api_is_reachable_as_px_amp():
    assert px.amp.LossScaler is LossScaler and issubclass(px.amp.LossScaleError, RuntimeError)
