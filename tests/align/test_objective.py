"""``PreferenceObjective`` on ``collate_pairs`` batches against a plain-PyTorch computation from
full logits: losses, TRL's statistics and gradients, for every method, padded and packed, LoRA
(reference = adapters disabled) and precomputed references; preference data rendering."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from parallax import peft
from parallax.align import PreferenceObjective, collate_pairs, dpo_loss, load_preference_pairs, orpo_loss, simpo_loss
from parallax.data import DEFAULT_CHAT_TEMPLATE, load_tokenizer
from parallax.finetune.data import SFTDataError
from parallax.models import from_preset

TOKENIZER = load_tokenizer("byte")


def _rows(n: int, seed: int = 0) -> list[dict]:
    """Prompts and completions of odd, varied lengths (chosen and rejected of different lengths)."""
    g = torch.Generator().manual_seed(seed)
    word = lambda k: "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (k,), generator=g))  # noqa: E731
    return [{"prompt": f"Q{i}: {word(3 + i % 5)}\nA:", "chosen": " " + word(2 + i % 3), "rejected": " " + word(4 + i % 4)}
            for i in range(n)]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = from_preset("llama-tiny", n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_size=64)
    peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


def _plain_logps(model, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) summed completion log-probabilities and counts, one sequence at a time from full logits."""
    sums, counts = [], []
    for example in [p.chosen for p in pairs] + [p.rejected for p in pairs]:
        inputs, targets = example.inputs_and_targets()
        logp = F.log_softmax(model(inputs[None]).float()[0], dim=-1)
        keep = targets >= 0
        sums.append(logp[keep].gather(1, targets[keep][:, None]).sum())
        counts.append(keep.sum().float())
    return torch.stack(sums), torch.stack(counts)


def _plain_loss(model, pairs, method: str, beta: float, label_smoothing: float = 0.0):
    B = len(pairs)
    logps, counts = _plain_logps(model, pairs)
    if method in ("dpo", "ipo", "hinge"):
        with torch.no_grad(), model.disable_adapter():
            ref, _ = _plain_logps(model, pairs)
        loss_type = {"dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge"}[method]
        out = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta, loss_type, label_smoothing)
    elif method == "simpo":
        avg = logps / counts
        out = simpo_loss(avg[:B], avg[B:], beta, 0.5, label_smoothing)
    else:
        avg = logps / counts
        out = orpo_loss(avg[:B], avg[B:], -avg[:B], beta)
    return out[0].mean(), out[1], out[2], logps


@pytest.mark.parametrize("method,label_smoothing,packing", [
    ("dpo", 0.0, False), ("dpo", 0.1, True), ("ipo", 0.0, False), ("hinge", 0.0, True), ("simpo", 0.0, True),
    ("simpo", 0.2, False), ("orpo", 0.0, False), ("orpo", 0.0, True)])
def test_objective_equals_plain_pytorch(tmp_path, method, label_smoothing, packing):
    pairs = load_preference_pairs(_write(tmp_path / "p.jsonl", _rows(5)), TOKENIZER, max_length=64)
    model = _model()
    beta = 0.3
    batch = collate_pairs(pairs, pad_id=0, packing=packing, block_size=40)
    if packing:
        assert batch.input_ids.shape[0] < 2 * len(pairs)  # several sequences share a row
    loss, stats = PreferenceObjective(method, beta, label_smoothing)(model, batch)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    expected, chosen_rewards, rejected_rewards, logps = _plain_loss(model, pairs, method, beta, label_smoothing)
    expected_grads = torch.autograd.grad(expected, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    B = len(pairs)
    torch.testing.assert_close(stats["rewards/chosen"], chosen_rewards.sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["rewards/rejected"], rejected_rewards.sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["rewards/margins"], (chosen_rewards - rejected_rewards).sum(), atol=1e-5,
                               rtol=1e-5)
    assert stats["rewards/accuracies"] == (chosen_rewards > rejected_rewards).sum()
    torch.testing.assert_close(stats["logps/chosen"], logps[:B].sum().detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats["logps/rejected"], logps[B:].sum().detach(), atol=1e-4, rtol=1e-5)


def test_rpo_alpha_adds_the_chosen_tokens_mean_nll(tmp_path):
    pairs = load_preference_pairs(_write(tmp_path / "p.jsonl", _rows(4)), TOKENIZER, max_length=64)
    model = _model()
    batch = collate_pairs(pairs, pad_id=0)
    loss = PreferenceObjective("dpo", 0.2, rpo_alpha=0.7)(model, batch)[0]
    dpo, _, _, logps = _plain_loss(model, pairs, "dpo", 0.2)
    chosen_tokens = sum(p.chosen.num_trained for p in pairs)
    torch.testing.assert_close(loss, dpo - 0.7 * logps[:4].sum() / chosen_tokens, atol=1e-5, rtol=1e-5)


def test_reference_is_the_base_model_and_a_precomputed_one_is_used_as_given(tmp_path):
    pairs = load_preference_pairs(_write(tmp_path / "p.jsonl", _rows(3)), TOKENIZER, max_length=64)
    model = _model()
    batch = collate_pairs(pairs, pad_id=0)
    with torch.no_grad():
        with model.disable_adapter():
            base, _ = _plain_logps(model, pairs)
        loss, stats = PreferenceObjective("dpo", 0.1)(model, batch)
        policy, _ = _plain_logps(model, pairs)
        # rewards are beta (policy - reference): the reference was the base model
        torch.testing.assert_close(stats["rewards/chosen"], 0.1 * (policy[:3] - base[:3]).sum(), atol=1e-5, rtol=1e-5)
        # a precomputed reference equal to the policy gives DPO's starting loss log 2
        same = PreferenceObjective("dpo", 0.1)(model, batch.with_reference(policy))[0]
    assert same.item() == pytest.approx(math.log(2), abs=1e-6)
    assert loss.item() != pytest.approx(math.log(2), abs=1e-4)


def test_a_model_without_adapters_needs_a_precomputed_reference(tmp_path):
    pairs = load_preference_pairs(_write(tmp_path / "p.jsonl", _rows(2)), TOKENIZER, max_length=64)
    plain = from_preset("llama-tiny", n_layer=1, n_embd=32, n_head=2, n_kv_head=1, block_size=64)
    with pytest.raises(ValueError, match="precompute"):
        PreferenceObjective("dpo")(plain, collate_pairs(pairs, pad_id=0))
    PreferenceObjective("simpo")(plain, collate_pairs(pairs, pad_id=0))  # reference-free: fine


def test_chat_rows_train_only_the_final_completion(tmp_path):
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "name a colour"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "red"}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    pair = load_preference_pairs(_write(tmp_path / "c.jsonl", [row]), TOKENIZER, max_length=200,
                                 chat_template=DEFAULT_CHAT_TEMPLATE)[0]
    for example, text in ((pair.chosen, "red"), (pair.rejected, "no")):
        trained = bytes(t for t, keep in zip(example.tokens, example.trained) if keep and t < 256).decode()
        assert trained.startswith(text) and "hello" not in trained and "colour" not in trained
        untrained = bytes(t for t, keep in zip(example.tokens, example.trained) if not keep and t < 256).decode()
        assert "hello" in untrained and "name a colour" in untrained


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "chosen": " a", "rejected": " a"}, "'chosen' equals 'rejected'"),
    ({"prompt": "p", "chosen": " a"}, "no 'rejected' field"),
    ({"chosen": " a", "rejected": " b"}, "no 'prompt' field"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"}, "'chosen' must be strings"),
    ({"prompt": "x" * 80, "chosen": " a", "rejected": " b"}, "'prompt' is 80 tokens"),
])
def test_bad_preference_rows_name_the_row_and_field(tmp_path, row, message):
    path = _write(tmp_path / "bad.jsonl", [_rows(1)[0], row])
    with pytest.raises(SFTDataError, match=message) as info:
        load_preference_pairs(path, TOKENIZER, max_length=64)
    assert f"{path}:2" in str(info.value)


@pytest.mark.parametrize("fields,message", [
    (dict(beta=0.0), "beta must be a positive finite number"), (dict(beta=-1), "beta"),
    (dict(beta=float("inf")), "beta"), (dict(method="kto"), "method must be one of"),
    (dict(label_smoothing=0.5), "label_smoothing"), (dict(method="ipo", label_smoothing=0.1), "label_smoothing"),
    (dict(rpo_alpha=-1.0), "rpo_alpha"), (dict(method="simpo", rpo_alpha=1.0), "rpo_alpha")])
def test_bad_objective_arguments(fields, message):
    with pytest.raises(ValueError, match=message):
        PreferenceObjective(**fields)
