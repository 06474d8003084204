"""Pipeline x tensor parallelism (TP=2 x PP=2, sequence parallel) on 4 gloo ranks against one
process, element-wise. Needs ``parallax.parallel.tensor`` (written in parallel with the pipeline)."""

from __future__ import annotations

import pytest

from tests.distributed.launch import run_ranks
from tests.parallel import pipeline_workers as pw
from tests.parallel.test_pipeline_training import PARAM_ATOL, _assert_matches

pytest.importorskip("parallax.parallel.tensor.plan")

CASES = [dict(family="gpt", schedule="1f1b", sequence_parallel=True, zero_stage=1, clip=0.05),
         dict(family="llama", schedule="interleaved", virtual_stages=2, sequence_parallel=True, zero_stage=2,
              clip=0.05)]


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(pw.tensor_pipeline, 4, CASES, timeout_s=120)


@pytest.mark.parametrize("case", range(len(CASES)), ids=["gpt-1f1b-sp-zero1", "llama-interleaved-sp-zero2"])
def test_tp2_x_pp2_matches_single_process(four_ranks, case):
    """Tied GPT embedding split over the vocabulary and copied to the last stage, sequence-split
    activations between stages, clipping over tp and pp: parameters after 3 steps, losses and
    norms equal one process's."""
    ref = pw.reference(CASES[case]["family"], 3, CASES[case]["clip"])
    ranks = [r[case] for r in four_ranks]
    _assert_matches(ranks, ref["params"], "params", PARAM_ATOL)
    for r in ranks:
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-6)
        assert r["norms"] == pytest.approx(ref["norms"], rel=1e-5)
