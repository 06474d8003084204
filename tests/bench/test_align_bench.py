"""``python -m bench align --quick``: parallax and both TRL DPO providers measured on the same
objective and tokens, and the figures hang together."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import records

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("datasets")


def test_align_quick_end_to_end(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "align", "--quick", "--json", "--threads", "1", "--steps", "1",
         "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(records.read_records(tmp_path / "align.jsonl")) == len(rows)
    by_name = {r["provider"]: r for r in rows}
    assert set(by_name) == {"parallax", "parallax packed", "TRL PEFT ref", "TRL explicit ref"}
    assert len({r["trainable"] for r in rows}) == 1  # the same LoRA layers everywhere
    ours = by_name["parallax"]
    assert by_name["parallax packed"]["median_ms"] > 0  # its speed is measured, not compared here
    for r in rows:
        assert r["steps"] == 1 and r["median_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["peak_mb"] > r["weights_mb"] > 0
        # B starts at zero: policy = reference, so the first loss is log 2 and the log-probabilities
        # are the base model's, sequence by sequence without padding
        assert r["loss0"] == pytest.approx(math.log(2), abs=1e-6), r["provider"]
        assert r["logps0_err"] < 1e-3, (r["provider"], r["logps0_err"])
        # identical tokens and the same first update: the same statistics before and after it
        assert r["logps0_chosen"] == pytest.approx(ours["logps0_chosen"], abs=1e-3)
        assert r["logps0_rejected"] == pytest.approx(ours["logps0_rejected"], abs=1e-3)
        assert r["margin1"] != 0 and r["margin1"] == pytest.approx(ours["margin1"], rel=1e-2), r["provider"]
        assert r["final_loss"] == pytest.approx(ours["final_loss"], abs=1e-4)
    # the explicit reference is a second copy of the base weights; the others hold one
    assert by_name["TRL explicit ref"]["weights_mb"] > 1.9 * by_name["TRL PEFT ref"]["weights_mb"]
    for name in ("parallax", "parallax packed"):
        assert by_name[name]["weights_mb"] == pytest.approx(by_name["TRL PEFT ref"]["weights_mb"], rel=1e-6)
    assert by_name["TRL PEFT ref"]["vs_trl"] == 1.0 and by_name["TRL explicit ref"]["memory_vs_explicit"] == 1.0
    goals = rows[-1]["notes"]["goals"]
    assert set(goals) == {f"{name} {goal}" for name in ("parallax", "parallax packed")
                          for goal in ("tokens/s >= 1.3x TRL PEFT ref", "peak memory <= 0.6x TRL explicit ref")}
