"""``python -m bench parallel``: the bubble arithmetic on synthetic timelines, the compute recorder, and
``--quick`` end to end on 2 gloo ranks."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bench import records
from bench.parallel import ComputeRecorder, bubble_formula, busy_seconds, idle_fractions

ROOT = Path(__file__).resolve().parents[2]


def gpipe_timeline(stages: int, micro_batches: int, t_fwd: float, t_bwd: float, t0: float = 100.0):
    """Per stage, the compute intervals of an ideal GPipe step (all forwards, then all backwards
    in reverse stage order) with equal stages and free communication."""
    timeline = [[] for _ in range(stages)]
    for s in range(stages):
        for i in range(micro_batches):
            start = t0 + (s + i) * t_fwd
            timeline[s].append((start, start + t_fwd))
    backward_start = t0 + (micro_batches + stages - 1) * t_fwd
    for s in range(stages):
        for i in range(micro_batches):
            start = backward_start + (stages - 1 - s + i) * t_bwd
            timeline[s].append((start, start + t_bwd))
    return timeline


@pytest.mark.parametrize("stages,micro_batches", [(2, 1), (2, 2), (2, 4), (2, 8), (4, 4), (4, 16)])
def test_idle_of_an_ideal_gpipe_timeline_is_the_formula(stages, micro_batches):
    idle = idle_fractions(gpipe_timeline(stages, micro_batches, t_fwd=1.0, t_bwd=2.0))
    assert idle == pytest.approx([bubble_formula(stages, micro_batches)] * stages, abs=1e-12)


def test_formula_values():
    assert bubble_formula(2, 2) == pytest.approx(1 / 3)
    assert bubble_formula(2, 4) == pytest.approx(1 / 5)
    assert bubble_formula(2, 8) == pytest.approx(1 / 9)
    assert bubble_formula(1, 4) == 0.0
    assert bubble_formula(2, 4, virtual_stages=2) == pytest.approx(1 / 9)
    assert bubble_formula(4, 8, virtual_stages=2) == pytest.approx(3 / 19)
    with pytest.raises(ValueError, match="micro_batches"):
        bubble_formula(2, 0)


def test_busy_time_is_the_clipped_union():
    # overlapping, nested, unsorted and partly outside the window [1, 10]
    intervals = [(5.0, 6.0), (0.0, 2.0), (1.5, 3.0), (2.0, 2.5), (9.0, 12.0)]
    assert busy_seconds(intervals, 1.0, 10.0) == pytest.approx((3.0 - 1.0) + 1.0 + 1.0)
    assert busy_seconds([], 0.0, 1.0) == 0.0


def test_idle_fractions_span_all_ranks():
    # rank 0 computes in [0, 4], rank 1 in [2, 3] and [6, 8]: the span is [0, 8]
    idle = idle_fractions([[(0.0, 4.0)], [(2.0, 3.0), (6.0, 8.0)]])
    assert idle == pytest.approx([0.5, 5 / 8])
    with pytest.raises(ValueError, match="no compute"):
        idle_fractions([[], []])


def test_compute_recorder_records_outermost_forwards_and_backwards():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(3, 4)
    recorder = ComputeRecorder()
    recorder.attach(list(model.modules()))
    original_backward = torch.autograd.backward
    with recorder.recording() as intervals:
        model(x).sum().backward()
        model(x).sum().backward()
    assert torch.autograd.backward is original_backward
    assert len(intervals) == 4  # two forwards (nested modules once each), two backwards
    assert all(b >= a for a, b in intervals)
    assert [a for a, _ in intervals] == sorted(a for a, _ in intervals)
    recorder.detach()
    with recorder.recording() as intervals:
        model(x).sum().backward()
    assert len(intervals) == 1  # only the backward once the hooks are gone


class _Stage:
    """A pipeline stage whose executor calls methods, not the module: the loss outside any module."""

    def __init__(self) -> None:
        self.body = nn.Linear(4, 4)

    def run(self, x):
        return self.body(x)

    def loss(self, y):
        return (y ** 2).mean()


def test_compute_recorder_times_method_entry_points_once():
    stage, x = _Stage(), torch.randn(2, 4)
    recorder = ComputeRecorder()
    recorder.attach([stage.body])
    recorder.attach_methods(stage, ("run", "loss"))
    with recorder.recording() as intervals:
        stage.loss(stage.run(x))
    assert len(intervals) == 2  # run (with the module call nested in it) and loss
    recorder.detach()
    assert "run" not in vars(stage) and "loss" not in vars(stage)
    with recorder.recording() as intervals:
        stage.loss(stage.run(x))
    assert intervals == []


def test_quick_end_to_end(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "parallel", "--quick", "--json", "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(records.read_records(tmp_path / "parallel.jsonl")) == len(rows)
    cases = {(r["case"], r["provider"]): r for r in rows}
    expected_cases = {"tp", "pp-gpipe-m2", "pp-1f1b-m2", "pp-interleaved-m2"}
    assert {case for case, _ in cases} == expected_cases
    assert set(cases) == {(case, impl) for case in expected_cases for impl in ("torch", "parallax")}, (
        rows[0]["notes"].get("skipped"))
    for r in rows:
        assert r["degree"] == 2 and len(r["step_ms"]) == r["steps"]
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        # same weights, batches and AdamW arithmetic: the two implementations' losses agree
        assert r["max_loss_diff"] is not None and r["max_loss_diff"] < 1e-4, (r["case"], r["max_loss_diff"])
        torch_row = cases[(r["case"], "torch")]
        assert r["vs_torch"] == pytest.approx(r["median_ms"] / torch_row["median_ms"])
        ratios = [a / b for a, b in zip(r["step_ms"], torch_row["step_ms"])]
        assert r["vs_torch_paired"] == pytest.approx(statistics.median(ratios))
        if r["parallel"] == "pp":
            v = 2 if r["schedule"] == "interleaved" else 1
            assert r["virtual_stages"] == v and r["bubble_formula"] == pytest.approx(1 / (2 * v + 1))
            assert 0 < r["idle"] < 1 and len(r["idle_per_rank"]) == 2
            assert len(r["timeline_ms"]) == 2 and all(a <= b for rank in r["timeline_ms"] for a, b in rank)
        else:
            assert "idle" not in r
    assert any(key.startswith("tp: parallax step") for key in rows[-1]["notes"]["goals"])
