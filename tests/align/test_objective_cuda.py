"""``PreferenceObjective`` on CUDA (run by bench/gpu_suite.sh): packed pairs are one padding-free
row (varlen FlashAttention, the Triton linear + cross-entropy), padded pairs the fused head; both
give the CPU plain-PyTorch losses, statistics and LoRA gradients."""

from __future__ import annotations

import pytest
import torch

from parallax.align import PreferenceObjective, collate_pairs, load_preference_pairs

from tests.align.test_objective import TOKENIZER, _model, _plain_loss, _rows, _write

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["dpo", "simpo"])
@pytest.mark.parametrize("packing", [False, True])
def test_cuda_objective_equals_the_cpu_reference(tmp_path, method, packing):
    pairs = load_preference_pairs(_write(tmp_path / "p.jsonl", _rows(6)), TOKENIZER, max_length=64)
    cpu = _model()
    expected, chosen_rewards, _, _ = _plain_loss(cpu, pairs, method, 0.2)
    expected_grads = torch.autograd.grad(expected, [p for p in cpu.parameters() if p.requires_grad])
    model = _model().cuda()
    batch = collate_pairs(pairs, pad_id=0, packing=packing, block_size=64, device="cuda")
    if packing:
        assert batch.input_ids.shape[0] == 1  # one padding-free row
    loss, stats = PreferenceObjective(method, 0.2)(model, batch)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss.cpu(), expected, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(stats["rewards/chosen"].cpu(), chosen_rewards.sum(), atol=2e-4, rtol=2e-4)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-3)
