"""`python -m bench serve --http --quick` end to end: parallax serve, transformers serve and the
in-process engine on the same tiny model, over 127.0.0.1; every request completes with every token
it asked for, and the record carries what the full run reports."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_http_bench_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "serve", "--http", "--quick", "--threads", "1",
                           "--results-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the table has the HTTP columns (bench.serve.columns), not bench serve's
    header = proc.stdout.splitlines()[0]
    assert "ITL p99 [ms]" in header and "vs in-proc [x]" in header and "KV waste" not in header, header
    rows = [json.loads(line) for line in (tmp_path / "serve.jsonl").read_text().splitlines()]
    by_key = {(r["provider"], r["load"]): r for r in rows}
    assert set(by_key) == {("in-process", "4 req/s"), ("parallax serve", "4 req/s"), ("transformers serve", "4 req/s"),
                           ("in-process", "burst"), ("parallax serve", "burst"),
                           ("parallax base", "burst"), ("parallax 8 adapters", "burst")}, sorted(by_key)
    swept = [by_key[(p, "4 req/s")] for p in ("in-process", "parallax serve", "transformers serve")]
    for r in rows:
        assert r["failed"] == 0 and r["completed"] == r["requests"] >= 2, r
        assert r["short_requests"] == 0, r  # end-of-text never came: every server generated max_tokens
        assert r["prompt_mismatches"] == 0, r  # every server made the same ids of the prompt text
        assert r["tokens_per_s"] > 0 and 0 < r["ttft_mean_ms"] <= r["ttft_p99_ms"]
    # the same schedule and lengths for every provider at a rate
    assert len({(r["requests"], r["output_tokens"]) for r in swept}) == 1
    assert swept[0]["rate"] == 4.0 and by_key[("parallax serve", "burst")]["rate"] is None
    # the engine's own ITL (its /metrics, the in-process engine's metrics) is measured for both
    assert all(by_key[(p, "4 req/s")]["engine_itl_ms"] > 0 for p in ("in-process", "parallax serve"))
    http = by_key[("parallax serve", "burst")]
    assert http["vs_inprocess"] > 0 and "ttft_delta_ms" in http
    assert by_key[("parallax 8 adapters", "burst")]["vs_base"] > 0
    assert by_key[("parallax base", "burst")]["output_tokens"] == by_key[("parallax 8 adapters", "burst")]["output_tokens"]
    notes = rows[-1]["notes"]
    assert "lognormal" in notes["workload"] and "Llama" in notes["model"]
    assert set(notes["startup_s"]) == {"parallax serve", "transformers serve"}
    assert set(notes["sustainable_rate"]) == {"parallax serve", "in-process", "transformers serve"}
    assert notes["goals"].startswith("not judged: a quick run")
    assert rows[0]["versions"]["transformers"]
