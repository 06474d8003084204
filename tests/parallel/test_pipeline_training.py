"""Pipeline parallelism on real gloo ranks against a single-process plain run, element-wise.

All 2-rank cases run in one spawn and the 4-rank ones in another (a spawn costs more than the
tiny runs). Tolerances: micro-batching sums the loss in another order than one batch does, a
~1e-7 relative difference in the gradients, which AdamW turns into parameter differences of a
few 1e-6 after 3 steps of lr 3e-3 on the smallest gradients; a wrong gradient moves parameters
by ~lr.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import run_ranks
from tests.parallel import pipeline_workers as pw

PARAM_ATOL = 2e-5
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4
SCHEDULES = [("gpipe", {}), ("1f1b", {}), ("interleaved", {"virtual_stages": 2})]

TWO_RANK_CASES = (
    [dict(family=f, schedule=s, **o) for f in ("gpt", "llama") for s, o in SCHEDULES]
    + [dict(family="gpt", schedule="interleaved", virtual_stages=2, micro_batches=4, activation_checkpointing=True,
            clip=0.05),
       dict(family="gpt", schedule="1f1b", precision="fp16", inject_inf_step=1, steps=2)]
)
FOUR_RANK_CASES = [dict(family="gpt", schedule="1f1b", zero_stage=1, clip=0.05),
                   dict(family="llama", schedule="interleaved", virtual_stages=2, zero_stage=2, clip=0.05)]


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(pw.suite, 2, TWO_RANK_CASES, True, timeout_s=120)


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(pw.suite, 4, FOUR_RANK_CASES, timeout_s=120)


@pytest.fixture(scope="module")
def references():
    return {(family, clip): pw.reference(family, 3, clip) for family in ("gpt", "llama") for clip in (None, 0.05)}


def _full_name(name: str, reference: dict) -> str:
    return name if name in reference else "transformer.wte.weight"  # the last stage's tied copy


def _assert_matches(ranks: list[dict], reference: dict, what: str, atol: float, rtol: float = 0.0) -> None:
    seen = set()
    for r in ranks:
        for name, value in r[what].items():
            expected = reference[_full_name(name, reference)]
            torch.testing.assert_close(value, expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
            seen.add(_full_name(name, reference))
    assert seen == set(reference), "the stages together hold every parameter"


def _case_results(results: list[dict], case: int) -> list[dict]:
    return [rank["cases"][case] for rank in results]


@pytest.mark.parametrize("case", range(6), ids=[f"{c['family']}-{c['schedule']}" for c in TWO_RANK_CASES[:6]])
def test_pp2_matches_single_process_adamw(two_ranks, references, case):
    """GPT (tied embeddings) and Llama (untied, GQA) with each schedule: losses, the first step's
    gradients and the parameters after 3 AdamW steps equal one process's."""
    spec = TWO_RANK_CASES[case]
    ranks = _case_results(two_ranks, case)
    ref = references[(spec["family"], None)]
    _assert_matches(ranks, ref["grads"], "grads", GRAD_ATOL, GRAD_RTOL)
    _assert_matches(ranks, ref["params"], "params", PARAM_ATOL)
    for r in ranks:  # every rank of the pipeline returns the batch's loss
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-6)
        assert r["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)


def test_schedules_give_identical_gradients(two_ranks):
    for family_start in (0, 3):
        gpipe, one_f_one_b, interleaved = (_case_results(two_ranks, family_start + k) for k in range(3))
        for a, b, c in zip(gpipe, one_f_one_b, interleaved):
            for name in a["grads"]:
                torch.testing.assert_close(b["grads"][name], a["grads"][name], atol=1e-7, rtol=1e-6)
            # The interleaved stage holds other blocks (0, 2 / 1, 3): compare those it shares.
            for name in set(a["grads"]) & set(c["grads"]):
                torch.testing.assert_close(c["grads"][name], a["grads"][name], atol=1e-7, rtol=1e-6)


def test_tied_embedding_stays_identical_on_first_and_last_stage(two_ranks):
    for case in range(3):
        first, last = _case_results(two_ranks, case)
        assert first["pp_tied"] == {"transformer.wte.weight": 1} and last["pp_tied"] == {"lm_head.weight": 0}
        assert torch.equal(first["params"]["transformer.wte.weight"], last["params"]["lm_head.weight"])


def test_clipping_and_activation_checkpointing_under_interleaved_pp(two_ranks, references):
    """Interleaved with 4 micro-batches (warm-up, steady 1F1B and cool-down phases), every block
    checkpointed, gradients clipped: the clipped norms and the parameters equal one process's."""
    ranks = _case_results(two_ranks, 6)
    ref = references[("gpt", 0.05)]
    assert [r["checkpointed"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["norms"] == pytest.approx(ref["norms"], rel=1e-5)
    _assert_matches(ranks, ref["params"], "params", PARAM_ATOL)


def test_fp16_loss_scaling_skips_a_step_on_every_stage(two_ranks):
    """An inf in the first stage's gradients skips the step on the last stage too, and the tied
    copies stay identical."""
    first, last = _case_results(two_ranks, 7)
    assert first["skipped"] == last["skipped"] == [False, True]
    assert torch.equal(first["params"]["transformer.wte.weight"], last["params"]["lm_head.weight"])
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (first, last))


def test_zero3_is_refused(two_ranks):
    assert "ZeRO stage 3 cannot run under pipeline parallelism" in two_ranks[0]["zero3"]


@pytest.mark.parametrize("case", range(2), ids=["gpt-1f1b-zero1", "llama-interleaved-zero2"])
def test_pp2_x_dp2_with_zero_matches_single_process(four_ranks, references, case):
    spec = FOUR_RANK_CASES[case]
    ranks = _case_results(four_ranks, case)
    ref = references[(spec["family"], 0.05)]
    _assert_matches(ranks, ref["params"], "params", PARAM_ATOL)
    for r in ranks:
        assert r["norms"] == pytest.approx(ref["norms"], rel=1e-5)
