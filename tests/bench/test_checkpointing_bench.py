"""``python -m bench checkpointing --quick``: every provider measured, and the figures hang together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import records

ROOT = Path(__file__).resolve().parents[2]


def test_checkpointing_quick_end_to_end(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "checkpointing", "--quick", "--json", "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(records.read_records(tmp_path / "checkpointing.jsonl")) == len(rows)
    by_name = {r["provider"]: r for r in rows}
    expected = {"none", "block", "every_n:2"} | ({"block+offload"} if rows[0]["device"]["type"] == "cuda" else set())
    assert set(by_name) == expected, sorted(by_name)
    n_layer = rows[0]["n_layer"]
    assert [by_name[n]["checkpointed"] for n in ("none", "block", "every_n:2")] == [
        f"0/{n_layer}", f"{n_layer}/{n_layer}", f"{(n_layer + 1) // 2}/{n_layer}"]
    for r in rows:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["saved_bytes"] > 0 and r["saved_storages"] > 0
        # recomputation is exact: the same updates as the plain model
        assert r["max_diff"] is not None and r["max_diff"] < 1e-6, (r["provider"], r["max_diff"])
    none, block, half = by_name["none"], by_name["block"], by_name["every_n:2"]
    assert none["mem_x"] == 1.0 and none["vs_none"] == 1.0
    assert none["saved_bytes"] > half["saved_bytes"] > block["saved_bytes"]
    assert block["mem_x"] >= 4.0, block
    assert any(key.startswith("block:") for key in rows[-1]["notes"]["goals"])
