"""``python -m bench zero --quick``: every provider measured on 2 gloo ranks, and the figures hang together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import records

ROOT = Path(__file__).resolve().parents[2]


def test_zero_quick_end_to_end(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "zero", "--quick", "--json", "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(records.read_records(tmp_path / "zero.jsonl")) == len(rows)
    from bench import zero

    by_name = {r["provider"]: r for r in rows}
    assert set(by_name) == set(zero.PROVIDERS)
    psi, world = rows[0]["params"], rows[0]["ranks"]
    assert world == 2
    for r in rows:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["opt_ms"] > 0
        stage = zero.FORMULA_STAGE[r["provider"]]
        assert r["formula_mb"] * 2**20 == zero.formula_bytes(stage, psi, world)["total"]
        assert r["peak_mb"] >= r["states_mb"] > 0
        # same initial weights, same batches, same AdamW arithmetic: the parameters agree
        assert r["max_diff"] is not None and r["max_diff"] < 1e-5, (r["provider"], r["max_diff"])
    assert by_name["ddp"]["vs_ddp"] == 1.0 and by_name["fsdp2"]["vs_fsdp2"] == 1.0
    # what every rank holds at rest: the replicated providers match the paper exactly, the sharded
    # ones within the padding of their flat buffers / shards
    for name in ("ddp", "parallax-0"):
        assert by_name[name]["vs_formula"] == 1.0, name
    for name in ("fsdp2", "parallax-2", "parallax-3"):
        assert abs(by_name[name]["vs_formula"] - 1.0) < 0.01, (name, by_name[name]["vs_formula"])
    goals = rows[-1]["notes"]["goals"]
    assert any(key.startswith("parallax-2 step") for key in goals)


def test_formula_matches_the_zero_paper():
    from bench.zero import formula_bytes, mixed_precision_formula

    psi, n = 1000, 4
    assert [formula_bytes(s, psi, n)["total"] for s in range(4)] == [16 * psi, 4 * psi + 4 * psi + 2 * psi,
                                                                      4 * psi + psi + 2 * psi, 4 * psi]
    # the paper's Figure 1 example: Psi = 7.5B, N = 64, K = 12 -> 120 GB, 31.4 GB, 16.6 GB, 1.88 GB
    psi, n = 7.5e9, 64
    assert [round(mixed_precision_formula(s, psi, n) / 1e9, 2) for s in range(4)] == [120.0, 31.41, 16.64, 1.88]
