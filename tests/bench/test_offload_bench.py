"""`python -m bench offload --quick` runs both providers on the same training and they agree."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_offload_bench_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "offload", "--quick", "--json", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert {r["provider"] for r in rows} == {"offload=none", "offload=cpu"}
    assert all(r["max_diff"] == 0.0 and r["median_ms"] > 0 for r in rows), rows
    assert (tmp_path / "offload.jsonl").exists()
