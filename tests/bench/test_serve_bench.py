"""`python -m bench serve --quick` runs every engine on the same workload and they agree."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_bench_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "serve", "--quick", "--json", "--threads", "1",
                           "--results-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["provider"]: r for r in (json.loads(line) for line in proc.stdout.splitlines() if line.strip())}
    engines = {"parallax continuous", "parallax static", "HF sequential", "HF padded"}
    assert engines | {"decode batch=1", "decode batch=4"} == set(rows)
    for name in engines:
        r = rows[name]
        assert r["requests"] == 10 and r["output_tokens"] == rows["HF sequential"]["output_tokens"]
        assert r["tokens_per_s"] > 0 and 0 < r["ttft_mean_ms"] <= r["ttft_p99_ms"]
        assert 0 <= r["kv_waste_pct"] < r["contig_waste_pct"] <= 100
    # greedy on the same weights: every engine produces HF's tokens
    assert rows["parallax continuous"]["same_tokens_pct"] == 100.0
    assert rows["parallax static"]["same_tokens_pct"] == 100.0
    assert rows["HF sequential"]["kv_waste_pct"] == 0.0  # a cache grown token by token holds no empty slot
    notes = rows["parallax continuous"]["notes"]
    assert "lognormal" in notes["workload"]
    assert notes["goals"].startswith("not judged: a quick run"), notes["goals"]  # too small to judge
    assert (tmp_path / "serve.jsonl").exists()
