"""bench/gpu_suite.sh: its exit status says whether every step passed, and it names the failed ones.

The suite needs a GPU, so it runs here against a stand-in interpreter (``PYTHON``) that answers
every step and fails the ones whose command line contains ``FAIL_ON``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[2] / "bench" / "gpu_suite.sh"
STAND_IN = """#!/usr/bin/env bash
case " $* " in *"$FAIL_ON"*) [ -n "$FAIL_ON" ] && { echo "stand-in: failing $*"; exit 3; } ;; esac
exit 0
"""


def _run_suite(tmp_path: Path, fail_on: str, **env: str) -> subprocess.CompletedProcess:
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "OUT": str(tmp_path / "out"), "FAIL_ON": fail_on, **env}
    env.pop("PARALLAX_BENCH_RESULTS", None)
    return subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("fail_on, failed", [("-m bench attention", "bench-attention"), ("-m pytest", "tests"),
                                             ("-m pip install", "build")])
def test_a_failed_step_makes_the_suite_fail_and_is_named(tmp_path, fail_on, failed):
    result = _run_suite(tmp_path, fail_on)
    assert result.returncode != 0, result.stdout
    assert result.stdout.rstrip().splitlines()[-1] == f"gpu_suite: FAILED steps: {failed}", result.stdout


def test_the_suite_passes_when_every_step_passes(tmp_path):
    result = _run_suite(tmp_path, "")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().splitlines()[-1] == "gpu_suite: all 12 steps passed", result.stdout


def test_the_log_and_the_packed_results_land_in_out(tmp_path):
    result = _run_suite(tmp_path, "")
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out"
    assert (out / "results.tgz").is_file()  # the device tool returns at most 8 files
    assert "=== bench-kernels" in (out / "gpu_suite.log").read_text()


def test_steps_past_the_budget_are_skipped_and_named(tmp_path):
    result = _run_suite(tmp_path, "", GPU_SUITE_BUDGET="10")  # under the 20 s a step needs to start
    assert result.returncode != 0
    last = result.stdout.rstrip().splitlines()[-1]
    assert last.startswith("gpu_suite: FAILED steps: build extension tests bench-kernels"), result.stdout


def test_gpu_suite_steps_runs_only_the_named_steps(tmp_path):
    result = _run_suite(tmp_path, "", GPU_SUITE_STEPS="bench-adamw,bench-serve")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().splitlines()[-1] == "gpu_suite: all 2 steps passed", result.stdout
