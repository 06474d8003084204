"""distill_loss (chunked, custom backward) against distill_loss_ref (full logits, autograd) in float64."""

import pytest
import torch

from parallax.compress import distill_loss, distill_loss_ref
from parallax.compress.distill import DIVERGENCES


def _inputs(n: int, v: int, c: int = 8, c_t: int = 12, ignored: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s_h = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    s_w = torch.randn(v, c, generator=g, dtype=torch.float64, requires_grad=True)
    t_h = torch.randn(n, c_t, generator=g, dtype=torch.float64)
    t_w = torch.randn(v, c_t, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignored and n > 1:
        targets[::3] = -100
    return s_h, s_w, t_h, t_w, targets


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("n,v,chunk,alpha,temperature", [
    (1, 123, None, 0.5, 1.0), (7, 123, 3, 0.3, 2.0), (97, 131, 10, 0.0, 0.7), (97, 5, 96, 1.0, 1.5)])
def test_matches_reference_value_and_gradients(divergence, n, v, chunk, alpha, temperature):
    s_h, s_w, t_h, t_w, targets = _inputs(n, v)
    kw = dict(alpha=alpha, temperature=temperature, divergence=divergence)
    loss = distill_loss(s_h, s_w, t_h, t_w, targets, chunk=chunk, **kw)
    grads = torch.autograd.grad(loss * 1.7, (s_h, s_w))
    ref = distill_loss_ref(s_h, s_w, t_h, t_w, targets, **kw)
    ref_grads = torch.autograd.grad(ref * 1.7, (s_h, s_w))
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_fp32_and_no_grad_path_agree_with_reference():
    s_h, s_w, t_h, t_w, targets = (t.detach().float() if t.is_floating_point() else t for t in _inputs(33, 70))
    with torch.no_grad():
        loss = distill_loss(s_h, s_w, t_h, t_w, targets, divergence="jsd", temperature=2.0, chunk=4)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, distill_loss_ref(s_h, s_w, t_h, t_w, targets, divergence="jsd", temperature=2.0))


def test_identical_teacher_leaves_only_cross_entropy():
    s_h, s_w, _, _, targets = _inputs(9, 40)
    for divergence in DIVERGENCES:
        loss = distill_loss(s_h, s_w, s_h.detach(), s_w.detach(), targets, alpha=0.25, divergence=divergence)
        ce = torch.nn.functional.cross_entropy(s_h @ s_w.t(), targets)
        torch.testing.assert_close(loss, 0.25 * ce)


def test_teacher_gets_no_gradient_and_chunk_is_irrelevant():
    s_h, s_w, t_h, t_w, targets = _inputs(20, 30)
    t_h.requires_grad_(True)
    losses = [distill_loss(s_h, s_w, t_h, t_w, targets, chunk=c) for c in (1, 7, 20)]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0])
    losses[0].backward()
    assert t_h.grad is None and s_h.grad is not None


def test_bad_input_is_named():
    s_h, s_w, t_h, t_w, targets = _inputs(4, 30)
    with pytest.raises(ValueError, match=r"teacher's vocabulary has 31 tokens but the student's has 30"):
        distill_loss(s_h, s_w, t_h, torch.zeros(31, t_w.shape[1], dtype=t_w.dtype), targets)
    with pytest.raises(ValueError, match="divergence"):
        distill_loss(s_h, s_w, t_h, t_w, targets, divergence="kl")
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(s_h, s_w, t_h, t_w, targets, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s_h, s_w, t_h, t_w, targets, temperature=0)
