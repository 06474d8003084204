"""ZeRO stages 0-3 on real gloo ranks against single-process torch.optim.AdamW, element-wise."""

from __future__ import annotations

import pytest

from tests.distributed import zero_workers as zw
from tests.distributed.launch import run_ranks

# (stage, steps, micro-steps per step, clip max_norm, gradient sync on every micro-step)
CASES = [(stage, 10, accum, clip, sync_all) for stage in (0, 1, 2, 3)
         for accum, clip, sync_all in ((1, None, False), (2, 0.05, False), (2, None, True))]


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_stage_matches_single_process_adamw(world_size):
    """Odd sizes, a frozen and a tied parameter, two param groups (different weight decay),
    gradient accumulation over 2 micro-steps (synced once, or on every micro-step) and clipping:
    parameters after 10 steps equal the single-process run within 1e-6, and the clipped total
    norm equals torch's."""
    results = run_ranks(zw.parity, world_size, CASES)
    for rank_results in results:
        for r in rank_results:
            worst = max(r["diffs"], key=r["diffs"].get)
            assert r["diffs"][worst] <= 1e-6, f"{r['case']}: {worst} differs by {r['diffs'][worst]:.3g}"
            assert r["norms"] == pytest.approx(r["ref_norms"], rel=1e-5), r["case"]
            assert set(r["diffs"]) >= {"embed.weight", "head.weight", "frozen", "blocks.2.fc.bias"}
