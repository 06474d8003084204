"""``python -m bench kernels --quick --cases sgmv`` on CPU (TRITON_INTERPRET=1 set): the batched
multi-LoRA rows (parallax: the C++ kernel, or the interpreted Triton one without the extension;
the per-adapter loop; one dense adapter; the engine's masked and sorted torch paths) with their
times and every path's agreement with the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallax import _extension

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark runs for real (gpu_suite.sh)")
def test_sgmv_rows_on_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "kernels", "--quick", "--device", "cpu", "--cases", "sgmv", "--json",
         "--results-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["provider"]: r for r in (json.loads(line) for line in done.stdout.splitlines() if line.strip())}
    assert set(rows) == {"parallax", "torch", "dense", "masked", "sorted"}
    compiled = _extension.has_kernel("sgmv", "cpu")
    assert rows["parallax"]["backend"] == ("cpu" if compiled else "triton (interpreted)")
    for provider in ("parallax", "masked", "sorted"):  # against sgmv_ref on 8 interleaved adapters
        assert rows[provider]["max_diff"] < 1e-5, rows[provider]
    assert rows["torch"]["vs_torch"] == 1.0 and rows["dense"]["vs_dense"] == 1.0
    assert all(r["fwd_ms"] > 0 and r["shape"].endswith("adapters=8") for r in rows.values()), rows
