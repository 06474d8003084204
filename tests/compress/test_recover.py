"""Recovery fine-tuning: the loss falls, pruned weights stay exactly zero (full and LoRA), and
only what should train changes."""

import pytest
import torch

from parallax import compress
from parallax.models import from_preset


def _pruned_tiny(sparsity: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    model = from_preset("tiny", n_layer=1, n_embd=32, n_head=2, block_size=32)
    with torch.no_grad():
        for _, linear in compress.target_linears(model):
            w = linear.weight
            w.mul_((torch.rand_like(w) >= sparsity).to(w.dtype))
    return model


def _windows(model, n=16, t=17):
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, 8, (n, 1), generator=g)
    return (base + torch.arange(t)) % model.config.vocab_size  # a learnable counting pattern


@pytest.mark.parametrize("lora_r", [None, 4])
def test_recovery_lowers_the_loss_and_keeps_the_zeros(lora_r):
    model = _pruned_tiny()
    zeros = {fqn: linear.weight == 0 for fqn, linear in compress.target_linears(model)}
    report = compress.recover(model, _windows(model), steps=8, lr=1e-2, batch_size=4, lora_r=lora_r)
    assert report["loss_last"] < report["loss_first"]
    changed = False
    for fqn, linear in compress.target_linears(model):
        assert torch.all(linear.weight[zeros[fqn]] == 0), fqn
        changed |= not torch.equal(linear.weight != 0, ~zeros[fqn])  # nothing pruned came back
    assert not changed
    assert not model.training and type(model).__name__ == "GPT"  # LoRA merged, the class restored


def test_sparsity_masks_find_only_pruned_layers():
    model = _pruned_tiny()
    masks = compress.sparsity_masks(model)
    assert len(masks) == len(compress.target_linears(model))
    assert all(abs(m.float().mean().item() - 0.5) < 0.1 for m in masks.values())


@pytest.mark.parametrize("kwargs, match", [({"steps": 0}, "steps"), ({"steps": 2, "lr": -1.0}, "lr"),
                                           ({"steps": 2, "lora_r": 0}, "lora_r")])
def test_bad_arguments_are_named(kwargs, match):
    model = _pruned_tiny()
    with pytest.raises(ValueError, match=match):
        compress.recover(model, _windows(model), **kwargs)
    with pytest.raises(ValueError, match="tokens"):
        compress.recover(model, _windows(model, n=2), steps=1, batch_size=4)
