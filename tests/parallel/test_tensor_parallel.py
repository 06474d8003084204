"""Tensor parallelism on gloo ranks against plain PyTorch, element-wise: each layer and the
vocabulary-parallel cross-entropy (outputs and gradients), and GPT / Llama-family models (and
Hugging Face's) trained against a single-process run of the plain model: parameters after 3
AdamW steps, losses, clipped gradient norms and full logits. The models' vocabulary (257, the byte
tokenizer's) is one tp = 2 does not divide: the embedding, the LM head and the loss split it 129 + 128.

Each world size is one launch whose results the tests read (spawning ranks costs more than the
checks themselves)."""

from __future__ import annotations

import pytest

from tests.distributed.launch import run_ranks
from tests.parallel import tensor_workers as tw

FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def two_rank_results() -> list[dict]:
    """Every tp = 2 check, one launch of 2 ranks: each rank's results."""
    return run_ranks(tw.two_rank_checks, 2, timeout_s=120)


@pytest.fixture(scope="module")
def two_ranks(two_rank_results) -> dict:
    """Rank 0's model results (cases by name, and "hf")."""
    return {**two_rank_results[0]["models"], "hf": two_rank_results[0]["hf"]}


@pytest.fixture(scope="module")
def four_ranks() -> dict:
    return run_ranks(tw.four_rank_checks, 4, timeout_s=120)[0]["models"]


def _layer_failures(two_rank_results, check: str) -> list[str]:
    return [r["layers"][check] for r in two_rank_results if r["layers"][check]]


def test_layers_match_full_modules(two_rank_results):
    """Column (gathered, sharded, fused q/k/v sections), row (split input or not), Hugging Face
    Conv1D layouts and the vocabulary embedding (with a padding row), with and without sequence
    parallelism, and an embedding and gathering LM head over a vocabulary tp does not divide:
    outputs, input gradients and this rank's slice of the parameter gradients equal the full
    module's."""
    failures = _layer_failures(two_rank_results, "layer_checks")
    assert not failures, failures


def test_vocab_parallel_cross_entropy_matches_full_logits(two_rank_results):
    """Loss and gradients of the vocabulary-parallel cross-entropy and of its fused, chunked
    linear form equal F.cross_entropy on the full logits (mean and per-row, ignored rows), for a
    vocabulary tp divides and for 97 ids (49 + 48)."""
    failures = _layer_failures(two_rank_results, "cross_entropy_checks")
    assert not failures, failures


def _assert_matches(result: dict, tol: float = FP32_TOL) -> None:
    assert not result["wrong_full_shapes"], f"ParallelState.full_shapes wrong for {result['wrong_full_shapes']}"
    assert not result["parallelize_drew_random_numbers"], "parallelize moved the random generator (unequal slices)"
    diffs = result["diffs"]
    missing = sorted(k for k, v in diffs.items() if v is None)
    assert not missing, f"parameters missing or of another shape: {missing}"
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= tol, f"{worst} differs from the single-process run by {diffs[worst]:.3g}"
    assert result["losses"] == pytest.approx(result["ref_losses"], rel=tol)
    assert result["norms"] == pytest.approx(result["ref_norms"], rel=tol)


@pytest.mark.parametrize("case", ["gpt", "llama", "qwen3"])
def test_tp2_training_matches_single_process(two_ranks, case):
    """GPT (fused q/k/v with GQA), Llama (GQA, untied head) and Qwen3 (q/k norms shared by split
    heads, biases, tied head): parameters after 3 AdamW steps, losses and full logits."""
    _assert_matches(two_ranks[case])


@pytest.mark.parametrize("case", ["gpt_sp", "qwen3_sp"])
def test_sequence_parallel_equals_plain_tensor_parallel(two_ranks, case):
    """Sequence parallelism on gives the parameters of sequence parallelism off (and of one process)."""
    _assert_matches(two_ranks[case])
    assert two_ranks[case]["vs_plain"] <= FP32_TOL


def test_gradient_clipping_under_tp_equals_single_process_clip(two_ranks):
    """opt.clip_grad_norm_ (the norm over tp, split parameters once, replicated ones once) clips
    like torch.nn.utils.clip_grad_norm_ on the full model; the clipped run's parameters match."""
    result = two_ranks["gpt_clip"]
    assert all(n > 0.05 for n in result["ref_norms"]), "the clip threshold must be active"
    _assert_matches(result)


def test_sequence_parallel_clipping_and_activation_checkpointing(two_ranks):
    """Llama with sequence parallelism (norm gradients summed over tp), clipping and every block
    checkpointed: still the single-process parameters."""
    _assert_matches(two_ranks["llama_sp_clip_ckpt"])


def test_bf16_under_tp_stays_close(two_ranks):
    """bf16 parameters and compute under TP: losses within 1% and parameters within bf16 rounding
    of the fp32 single-process run."""
    result = two_ranks["gpt_bf16"]
    assert result["losses"] == pytest.approx(result["ref_losses"], rel=1e-2)
    worst = max(v for k, v in result["diffs"].items() if k != "<logits>")
    assert worst <= 2e-2, worst


@pytest.mark.parametrize("case", ["hf_llama", "hf_gpt2"])
def test_hugging_face_models_match_unparallelized(two_ranks, case):
    """Hugging Face LlamaForCausalLM (GQA) and GPT2LMHeadModel (Conv1D, fused q/k/v, tied head)
    split over tp = 2: loss, every parameter's gradient and the logits equal the plain model's."""
    diffs = two_ranks["hf"][case]
    assert not [k for k, v in diffs.items() if v is None]
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= FP32_TOL, f"{worst} differs by {diffs[worst]:.3g}"


@pytest.mark.parametrize("case", list(tw.FOUR_RANK_CASES))
def test_tp2_x_dp2_with_zero_matches_single_process(four_ranks, case):
    """tp = 2 x dp = 2 on 4 ranks with ZeRO stages 1, 2 and 3 (stage 3 shards the tensor-parallel
    slices further over the data-parallel group), sequence parallelism, clipping (the norm over
    dp and tp) and checkpointing: the single-process parameters."""
    _assert_matches(four_ranks[case])
