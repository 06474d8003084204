"""``python -m bench kernels --quick`` on CPU: every case whose op exists is measured against the
PyTorch composition, a missing op is skipped with a note, Liger is reported unavailable on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import parallax as px
from bench import records
from bench.kernels import CASES, QUANT_CASES, _lce_goal, _quant_goals

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark runs for real (gpu_suite.sh)")
def test_kernels_quick_end_to_end_on_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "kernels", "--quick", "--device", "cpu", "--json", "--results-dir",
         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(records.read_records(tmp_path / "kernels.jsonl")) == len(rows)
    notes = rows[-1]["notes"]
    assert "needs CUDA" in notes["skipped"]["liger"]
    for case in CASES:
        case_rows = {r["provider"]: r for r in rows if r["case"] == case.name}
        if not hasattr(px.ops, case.op):
            assert not case_rows and "does not exist" in notes["skipped"][case.name]
            continue
        assert set(case_rows) == {"torch", "parallax"}, case.name
        torch_row, px_row = case_rows["torch"], case_rows["parallax"]
        assert torch_row["mem_x"] == 1.0 and torch_row["vs_torch"] == 1.0 and torch_row["max_diff"] == 0.0
        assert px_row["max_diff"] < 1e-4, px_row  # the same values as the composition, gradients included
        if case.op == "linear_cross_entropy":
            assert px_row["backend"] in ("chunked", "triton (interpreted)"), px_row["backend"]
        for r in case_rows.values():
            assert r["fwdbwd_peak_bytes"] > 0 and r["fwd_peak_mb"] > 0
            assert all(r[f"{m}_ms"] > 0 for m in ("fwd", "bwd", "fwdbwd")), r
    for name in QUANT_CASES:  # inference forwards against bf16 F.linear, with the weight-bytes floor
        case_rows = {r["provider"]: r for r in rows if r["case"] == name}
        assert set(case_rows) == {"torch", "parallax"}, name
        assert case_rows["parallax"]["max_diff"] < 1e-4  # against the op's dequantize-then-linear reference
        assert case_rows["parallax"]["weight_bytes"] < case_rows["torch"]["weight_bytes"] / 3
        assert all(r["fwd_ms"] > 0 and r["floor_ms"] > 0 for r in case_rows.values()), case_rows


def test_lce_goal_reads_memory_and_time_against_torch():
    row = dict(provider="parallax", vocab=128256, tokens=8192, hidden=4096, dtype="bf16", mem_x=4.5, vs_torch=1.05)
    (goal, verdict), = _lce_goal([row], torch.device("cuda")).items()
    assert ">= 4x less peak memory at <= 1.1x time" in goal and verdict.endswith(", met")
    assert _lce_goal([dict(row, vs_torch=1.2)], torch.device("cuda")).popitem()[1].endswith("NOT met")
    assert _lce_goal([dict(row, vs_torch=None, mem_x=3.0)], torch.device("cpu")).popitem()[1].endswith("NOT met")
    assert _lce_goal([dict(row, provider="torch")], torch.device("cpu")) == {}


def test_quant_goals_are_speedups_at_batch_one():
    rows = [dict(provider="parallax", case="int4_linear", batch=1, shape="batch=1", vs_torch=0.38),
            dict(provider="parallax", case="int8_linear", batch=1, shape="batch=1", vs_torch=0.7),
            dict(provider="parallax", case="int8_linear", batch=16, shape="batch=16", vs_torch=2.0),
            dict(provider="torch", case="int8_linear", batch=1, shape="batch=1", vs_torch=1.0)]
    goals = _quant_goals(rows)
    assert len(goals) == 2
    int4, = (v for k, v in goals.items() if k.startswith("int4_linear") and ">= 2.5x faster" in k)
    int8, = (v for k, v in goals.items() if k.startswith("int8_linear") and ">= 1.6x faster" in k)
    assert int4 == "2.63x, met" and int8 == "1.43x, NOT met"
