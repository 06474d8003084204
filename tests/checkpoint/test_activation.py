"""Activation checkpointing: same gradients as the plain model, far fewer saved activations, names kept."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

import parallax as px
from parallax.checkpoint import activation as activation_fn
from parallax.checkpoint.activation import (
    checkpointed_blocks,
    is_recomputing,
    saved_activation_bytes,
    saved_activations,
    select_blocks,
)
from parallax.models import GPT, GPTConfig
from tests.helpers import DEVICES, assert_close

# Importing the module by name gives the function (the package re-exports it under that name).
activation_module = importlib.import_module("parallax.checkpoint.activation")


def gpt(n_layer: int = 8, dropout: float = 0.0, seed: int = 0, attention: str = "sdpa") -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny", n_layer=n_layer, n_embd=64, n_head=4, block_size=64, dropout=dropout,
                                     attention=attention))


def batch(B: int = 4, T: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 257, (B, T), generator=g), torch.randint(0, 257, (B, T), generator=g)


def loss_and_grads(model: nn.Module, *inputs, seed: int = 123) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks for both models
    loss = model(*inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(plain: nn.Module, wrapped: nn.Module, *inputs) -> None:
    loss_a, grads_a = loss_and_grads(plain, *inputs)
    loss_b, grads_b = loss_and_grads(wrapped, *inputs)
    assert_close(loss_b, loss_a, atol=1e-6, name="loss")
    assert grads_a.keys() == grads_b.keys() == {n for n, p in plain.named_parameters() if p.requires_grad}
    for name in grads_a:
        assert_close(grads_b[name], grads_a[name], atol=1e-6, name=name)


def test_exported_as_px_checkpoint_activation():
    assert px.checkpoint.activation is activation_fn
    assert "activation" in px.checkpoint.__all__


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("policy", ["block", "every_n:2", "callable"])
def test_gradients_match_the_plain_model(policy, dropout):
    plain = gpt(dropout=dropout)
    wrapped = copy.deepcopy(plain)
    if policy == "callable":
        policy, expected = (lambda index, module: index in (1, 6)), [1, 6]
    else:
        expected = list(range(8)) if policy == "block" else [0, 2, 4, 6]
    assert activation_fn(wrapped, policy) is wrapped
    assert checkpointed_blocks(wrapped) == [wrapped.transformer.h[i] for i in expected]
    assert_same_grads(plain, wrapped, *batch())


def test_dropout_masks_are_replayed_not_redrawn():
    # With dropout, a recompute that drew new masks would give different gradients; this guards
    # the test above against passing because dropout happened to be inactive.
    plain = gpt(dropout=0.1)
    _, grads_seed_a = loss_and_grads(plain, *batch(), seed=1)
    _, grads_seed_b = loss_and_grads(plain, *batch(), seed=2)
    assert not torch.equal(grads_seed_a["transformer.h.0.mlp.c_fc.weight"], grads_seed_b["transformer.h.0.mlp.c_fc.weight"])


def test_saved_activation_memory_falls_at_least_4x():
    plain = gpt()
    wrapped = activation_fn(copy.deepcopy(plain), "block")
    x, y = batch()
    before = saved_activations(lambda: plain(x, y))
    after = saved_activations(lambda: wrapped(x, y))
    report = (f"plain: {before.nbytes} bytes in {before.count} storages ({before.tensors} saved tensors); "
              f"checkpointed: {after.nbytes} bytes in {after.count} storages ({after.tensors} saved tensors)")
    assert before.nbytes >= 4 * after.nbytes, report
    assert before.count >= 4 * after.count, report
    # what stays: one (B, T, C) fp32 input per block, plus what the embedding, final LayerNorm,
    # head and loss outside the blocks save
    block_input = 4 * 64 * 64 * 4
    assert after.nbytes >= 8 * block_input, report
    outside = saved_activations(lambda: activation_fn(copy.deepcopy(plain), lambda i, m: False)(x, y))
    assert after.nbytes - 8 * block_input <= outside.nbytes, report
    # backward still works through the measured graph, and the helper's int form agrees
    after.output.backward()
    assert saved_activation_bytes(lambda: wrapped(x, y)) == after.nbytes


def test_saved_activations_counts_storages_once_and_skips_parameters():
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    # tanh saves its output; the two sin calls save the same tensor twice: one storage
    measured = saved_activations(lambda: (torch.tanh(lin(x)).sin() + torch.tanh(lin(x)).sin()).sum())
    assert measured.tensors >= measured.count
    weight_bytes = lin.weight.numel() * 4
    # the weight (saved as a transposed view) is never counted; x is (it requires no grad)
    counted = saved_activations(lambda: lin(x).sum())
    assert counted.nbytes == x.numel() * 4 != weight_bytes
    assert saved_activations(lambda: lin(x).sum(), exclude=[x]).nbytes == 0


@pytest.mark.parametrize("device", DEVICES)
def test_offload_gives_the_same_gradients(monkeypatch, device):
    calls: list[bool] = []
    real = torch.autograd.graph.save_on_cpu

    def spy(pin_memory: bool = False, device_type: str = "cuda"):
        calls.append(pin_memory)
        return real(pin_memory=pin_memory, device_type=device_type)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", spy)
    # math attention: its dropout and backward are deterministic on CUDA too
    plain = gpt(dropout=0.1, attention="math").to(device)
    wrapped = activation_fn(copy.deepcopy(plain), "block", offload=True)
    x, y = (t.to(device) for t in batch())
    assert_same_grads(plain, wrapped, x, y)
    # one save_on_cpu per checkpointed block call; pinned (asynchronous copies) only for CUDA tensors
    assert calls == [device == "cuda"] * 8
    # the block inputs go to save_on_cpu's hooks, which the measuring hooks outside no longer see
    kept = saved_activations(lambda: activation_fn(copy.deepcopy(plain), "block")(x, y))
    offloaded = saved_activations(lambda: wrapped(x, y))
    assert offloaded.count == kept.count - 8, (kept, offloaded)


def test_names_parameters_and_state_dict_unchanged():
    plain = gpt()
    wrapped = copy.deepcopy(plain)
    params_before = list(wrapped.named_parameters())
    modules_before = [name for name, _ in wrapped.named_modules()]
    activation_fn(wrapped, "every_n:3")
    assert [(n, id(p)) for n, p in wrapped.named_parameters()] == [(n, id(p)) for n, p in params_before]
    assert [name for name, _ in wrapped.named_modules()] == modules_before
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    assert all(type(b) is type(plain.transformer.h[0]) for b in wrapped.transformer.h)
    # the blocks still count as repeated blocks, so ZeRO-3 finds the same units afterwards
    assert px.zero.default_units(wrapped) == list(wrapped.transformer.h)
    wrapped.load_state_dict(plain.state_dict())


def test_deepcopy_of_a_wrapped_model_runs_its_own_blocks():
    wrapped = activation_fn(gpt(n_layer=2), "block")
    twin = copy.deepcopy(wrapped)
    assert len(checkpointed_blocks(twin)) == 2
    loss_and_grads(twin, *batch())
    assert all(p.grad is None for p in wrapped.parameters())
    assert all(p.grad is not None for p in twin.parameters())


@pytest.mark.parametrize("policy", ["blocks", "every_n:0", "every_n:-1", "every_n:x", "every_n:", "every_n2", 3, None])
def test_bad_policy_raises_naming_it_and_the_allowed_ones(policy):
    with pytest.raises(ValueError) as err:
        activation_fn(gpt(n_layer=2), policy)
    message = str(err.value)
    assert repr(policy) in message and '"block"' in message and "every_n:K" in message and "callable" in message


def test_applying_twice_raises():
    model = activation_fn(gpt(n_layer=2))
    with pytest.raises(ValueError, match="already applied to 2 block"):
        activation_fn(model, "every_n:2")
    with pytest.raises(ValueError, match="already applied"):
        activation_fn(model.transformer)  # the same blocks reached from a submodule


def test_model_without_repeated_blocks_raises_and_suggests_a_callable():
    with pytest.raises(ValueError, match="no repeated blocks.*callable"):
        activation_fn(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(TypeError, match="needs an nn.Module"):
        activation_fn(lambda x: x)


def test_no_grad_and_eval_run_without_checkpoint(monkeypatch):
    plain = gpt(n_layer=2, dropout=0.1)
    wrapped = activation_fn(copy.deepcopy(plain))
    calls = []
    real = activation_module.checkpoint
    monkeypatch.setattr(activation_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, _ = batch()
    plain.eval()
    wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), plain(x))
    assert calls == []
    with torch.inference_mode():
        assert torch.equal(wrapped(x), plain(x))
    assert calls == []
    # eval mode with autograd on (e.g. gradients for attribution) still checkpoints
    assert_same_grads(plain, wrapped, *batch())
    assert len(calls) == 2


class Residual(nn.Module):
    """A non-GPT block called with a positional and keyword tensors: x + scale * f(x) masked."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, W), scale (W,), mask (B, W) bool -> (B, W)."""
        h = self.drop(torch.tanh(self.fc(x))) * scale
        return x + (h if mask is None else h.masked_fill(mask, 0.0))


class Stack(nn.Module):
    def __init__(self, width: int = 16, depth: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Residual(width) for _ in range(depth)])
        self.scale = nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, scale=self.scale, mask=mask)
        return x.square().mean()


def test_generic_model_with_keyword_arguments():
    torch.manual_seed(0)
    plain = Stack()
    wrapped = activation_fn(copy.deepcopy(plain), "every_n:2")
    x = torch.randn(8, 16, requires_grad=True)
    mask = torch.rand(8, 16) < 0.3
    assert_same_grads(plain, wrapped, x, mask)
    # the gradient reaching an input through a checkpointed block is the same too
    torch.manual_seed(5)
    (ga,) = torch.autograd.grad(plain(x, mask), x)
    torch.manual_seed(5)
    (gb,) = torch.autograd.grad(wrapped(x, mask), x)
    assert_close(gb, ga, atol=1e-6, name="x.grad")


def test_generic_sequential_of_identical_blocks():
    torch.manual_seed(0)
    plain = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Dropout(0.1)) for _ in range(6)])
    wrapped = activation_fn(copy.deepcopy(plain))
    assert checkpointed_blocks(wrapped) == list(wrapped)
    x = torch.randn(16, 32)
    grads = []
    for model in (plain, wrapped):
        torch.manual_seed(7)
        model(x).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], atol=1e-6, name=name)
    before = saved_activations(lambda: plain(x).pow(2).sum())
    after = saved_activations(lambda: wrapped(x).pow(2).sum())
    # plain: each block saves its Linear input, the GELU input and the dropout mask; checkpointed:
    # only the block input. Both: the input of pow.
    assert (before.count, after.count) == (3 * 6 + 1, 6 + 1), (before, after)
    assert after.nbytes == 7 * x.numel() * 4 < before.nbytes / 2.5, (before, after)


def test_select_blocks_counts_across_lists():
    class TwoStacks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
            self.b = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])

    model = TwoStacks()
    assert select_blocks(model, "every_n:2") == [model.a[0], model.a[2], model.b[1]]
    assert select_blocks(model, lambda i, m: m in set(model.b)) == list(model.b)


def test_which_hooks_fire_during_the_recompute():
    """What stage-3 gathering sees: the checkpointed block's own forward hooks fire once (in the
    forward), a tensor hook on its output fires in backward before the recompute, and its
    submodules' forward hooks fire again inside backward with is_recomputing() True."""
    model = activation_fn(gpt(n_layer=2), "block")
    events: list[tuple] = []
    for i, block in enumerate(model.transformer.h):
        block.register_forward_pre_hook(lambda m, a, i=i: events.append(("block pre", i, is_recomputing())))

        def post(m, a, out, i=i):
            events.append(("block post", i, is_recomputing()))
            out.register_hook(lambda g, i=i: events.append(("output grad", i, is_recomputing())))

        block.register_forward_hook(post)
        block.mlp.register_forward_pre_hook(lambda m, a, i=i: events.append(("mlp pre", i, is_recomputing())))
    loss = model(*batch())
    forward = list(events)
    assert forward == [("block pre", 0, False), ("mlp pre", 0, False), ("block post", 0, False),
                       ("block pre", 1, False), ("mlp pre", 1, False), ("block post", 1, False)]
    events.clear()
    loss.backward()
    assert events == [("output grad", 1, False), ("mlp pre", 1, True), ("output grad", 0, False), ("mlp pre", 0, True)]
    assert not is_recomputing()
