"""Preference losses against the papers' formulas evaluated element by element in Python floats,
their gradients against the closed forms, and sequence_logps against log_softmax + gather."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import parallax as px


def _logsig(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def _values(seed: int, n: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=g, dtype=torch.float64) * 30 for _ in range(4)]  # summed log-probs < 0


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_losses_follow_their_formulas(beta, loss_type, smoothing):
    pc, pr, rc, rr = _values(int(beta * 10) + len(loss_type))
    losses, chosen, rejected = px.align.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                                 label_smoothing=smoothing)
    for i in range(len(pc)):
        x = (pc[i].item() - pr[i].item()) - (rc[i].item() - rr[i].item())
        expected = {"sigmoid": -(1 - smoothing) * _logsig(beta * x) - smoothing * _logsig(-beta * x),
                    "ipo": (x - 1 / (2 * beta)) ** 2, "hinge": max(0.0, 1 - beta * x)}[loss_type]
        assert losses[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert chosen[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), rel=1e-12)
        assert rejected[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), rel=1e-12)


def test_dpo_gradient_is_the_closed_form():
    """d/d pi_c of -log sigma(beta x) = -beta sigma(-beta x); rewards carry no gradient."""
    pc, pr, rc, rr = _values(3)
    pc.requires_grad_(True)
    losses, chosen, _ = px.align.dpo_loss(pc, pr, rc, rr, beta=0.3)
    losses.sum().backward()
    x = (pc - pr) - (rc - rr)
    torch.testing.assert_close(pc.grad, -0.3 * torch.sigmoid(-0.3 * x.detach()))
    assert not chosen.requires_grad


def test_simpo_and_orpo_follow_their_formulas():
    g = torch.Generator().manual_seed(5)
    c, r = (-torch.rand(6, generator=g, dtype=torch.float64) * 3 - 0.01 for _ in range(2))  # average log-probs
    nll = torch.rand(6, generator=g, dtype=torch.float64) * 4
    simpo, sc, _ = px.align.simpo_loss(c, r, beta=2.0, gamma_beta_ratio=0.5)
    orpo, oc, _ = px.align.orpo_loss(c, r, nll, beta=0.1)
    for i in range(6):
        ci, ri = c[i].item(), r[i].item()
        assert simpo[i].item() == pytest.approx(-_logsig(2.0 * (ci - ri) - 2.0 * 0.5), rel=1e-12)
        log_odds = (ci - math.log(1 - math.exp(ci))) - (ri - math.log(1 - math.exp(ri)))
        assert orpo[i].item() == pytest.approx(nll[i].item() - 0.1 * _logsig(log_odds), rel=1e-12)
    torch.testing.assert_close(sc, 2.0 * c)
    torch.testing.assert_close(oc, 0.1 * c)


@pytest.mark.parametrize("call, message", [
    (lambda t: px.align.dpo_loss(t, t, t, t, beta=0.0), "beta must be a positive number"),
    (lambda t: px.align.dpo_loss(t, t, t, t, loss_type="kto"), "loss_type must be one of"),
    (lambda t: px.align.dpo_loss(t, t, t, t, loss_type="ipo", label_smoothing=0.1), "sigmoid' only"),
    (lambda t: px.align.dpo_loss(t, t, t, t, label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (lambda t: px.align.dpo_loss(t, t[:2], t, t), "shape"),
    (lambda t: px.align.simpo_loss(t, t, beta=-1.0), "beta"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.zeros(3))


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_equal_log_softmax_and_gather(average):
    g = torch.Generator().manual_seed(7)
    B, T, C, V = 3, 7, 13, 97
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)  # fp32: the fused op's dtypes are 16/32-bit
    weight = torch.randn(V, C, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :3] = -100  # a prompt out of the loss
    targets[2, 5:] = -100
    got = px.align.sequence_logps(hidden, weight, targets, average=average)
    mask = targets != -100
    logp = F.log_softmax(hidden.double() @ weight.double().T, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = (logp * mask).sum(1) / (mask.sum(1) if average else 1)  # float64 reference
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got.sum(), (hidden, weight))
    expected_grads = torch.autograd.grad(expected.sum(), (hidden, weight))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
