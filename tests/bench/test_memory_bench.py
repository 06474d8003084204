"""``python -m bench memory --quick``: every configuration measured on 2 gloo ranks against the planner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import records

ROOT = Path(__file__).resolve().parents[2]


def test_memory_quick_end_to_end(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "memory", "--quick", "--json", "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(records.read_records(tmp_path / "memory.jsonl")) == len(rows)
    from bench import memory
    from parallax.planner import zero_formula_bytes

    # the whole grid, stage 0 + offload left out (and said so)
    assert sorted((r["precision"], r["stage"], r["offload"], r["checkpointing"]) for r in rows) == sorted(memory.grid())
    assert len(rows) == 2 * (4 * 2 - 1) * 2
    assert "stage 0 + offload" in rows[0]["notes"]["skipped"]
    for r in rows:
        assert r["ranks"] == 2 and len(r["measured_per_rank_mb"]) == 2
        assert r["measured_mb"] == max(r["measured_per_rank_mb"]) > 0
        # the bound: predictions within 15% of the measured peaks
        assert abs(r["err_pct"]) <= 15.0, (r["precision"], r["stage"], r["offload"], r["checkpointing"], r["err_pct"])
        assert abs(r["predicted_mb"] / r["measured_mb"] - 1 - r["err_pct"] / 100) < 1e-9
        formula = zero_formula_bytes(r["stage"], r["precision"], r["offload"], r["params"], 2)
        assert abs(r["formula_mb"] * 2**20 - formula) < 1
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert (r["host_mb"] or 0) > 0 if r["offload"] == "cpu" else r["host_mb"] is None
    goals = rows[-1]["notes"]["goals"]
    assert any("within 15%" in key and value.endswith(", met") for key, value in goals.items())
