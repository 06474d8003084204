"""`bench attention` and `bench paged_attention`: FLOP counting, the CPU skip message (`bench
attention`), the CPU table of `bench paged_attention` (one small case), and the --quick smoke run
of every code path on CPU (tiny, in-process), so neither rots between GPU runs."""

from __future__ import annotations

import json

import pytest
import torch

import bench
from bench.attention import attention_flops

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmarks run for real (gpu_suite.sh)")


def _records(capsys, argv: list[str]) -> list[dict]:
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_flops_follow_flash_attentions_count():
    fwd = attention_flops(2, 3, 5, 8, False, "fwd")
    assert fwd == 4 * 2 * 3 * 5 * 5 * 8
    assert attention_flops(2, 3, 5, 8, True, "fwd") == fwd / 2
    assert attention_flops(2, 3, 5, 8, False, "bwd") == 2.5 * fwd
    assert attention_flops(2, 3, 5, 8, True, "fwd+bwd") == 3.5 * fwd / 2


def test_cpu_without_quick_says_why_it_skips(capsys):
    assert bench.main(["attention", "--no-save", "--device", "cpu"]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_paged_attention_cpu_table(capsys):
    """The CPU decode table: the compiled kernel, the engine's former gather + SDPA, the reference
    and contiguous SDPA on the same inputs, all agreeing, with bandwidths and speedups."""
    rows = _records(capsys, ["paged_attention", "--no-save", "--device", "cpu", "--json", "--batches", "3",
                             "--contexts", "40", "--budget", "0.01", "--copy-mb", "16"])
    from parallax import _extension

    expected = {"gather+sdpa", "reference", "sdpa"} | ({"cpu"} if _extension.has_kernel("paged_attention", "cpu")
                                                       else set())
    assert {r["provider"] for r in rows} == expected and {r["case"] for r in rows} == {"decode"}
    for r in rows:
        assert r["max_diff"] < 1e-5 and r["gbps"] > 0 and r["vs_gather"] > 0 and r["head_dim"] == 64, r
        assert r["dtype"] == "fp32" and (r["batch"], r["context"]) == (3, 40), r


def test_attention_quick_smoke_run_on_cpu(tmp_path, capsys):
    rows = _records(capsys, ["attention", "--quick", "--device", "cpu", "--json", "--results-dir", str(tmp_path)])
    assert {(r["provider"], r["causal"]) for r in rows} == {(p, c) for p in ("parallax", "sdpa-flash", "sdpa-math")
                                                            for c in (False, True)}
    for r in rows:
        assert r["max_diff"] < 1e-4, r  # every provider computes the same attention
        assert all(r[f"{m}_ms"] > 0 and r[f"{m}_tflops"] > 0 for m in ("fwd", "bwd", "fwdbwd")), r
        assert r["notes"]["parallax_backend"] in ("reference", "triton (interpreted: TRITON_INTERPRET=1)")
    flash = [r for r in rows if r["provider"] == "sdpa-flash"]
    assert all(r["fwd_vs_flash"] == pytest.approx(1.0) for r in flash)
    assert (tmp_path / "attention.jsonl").exists()


def test_paged_attention_quick_smoke_run_on_cpu(tmp_path, capsys):
    rows = _records(capsys, ["paged_attention", "--quick", "--device", "cpu", "--json", "--results-dir",
                             str(tmp_path)])
    providers = {r["provider"] for r in rows}
    assert {"sdpa", "gather+sdpa", "reference"} <= providers and "cuda" not in providers
    from parallax import _extension

    assert ("cpu" in providers) == _extension.has_kernel("paged_attention", "cpu")
    for r in rows:
        assert r["max_diff"] < 1e-5 and r["gbps"] > 0 and r["copy_gbps"] > 0, r
    rows = _records(capsys, ["paged_attention", "--quick", "--device", "cpu", "--json", "--no-save", "--providers",
                             "cuda,sdpa", "--prefill-prefixes", ""])
    assert {r["provider"] for r in rows if r["case"] == "decode"} == {"sdpa"}
    assert "cuda" in rows[0]["notes"]["skipped"]  # the CUDA kernel needs CUDA tensors: skipped, with the reason
    prefill = [r for r in rows if r["case"] == "prefill"]
    assert {r["provider"] for r in prefill} == {"varlen", "gather+flash"}
    assert all(r["tflops"] > 0 and r["new_tokens"] < r["context"] for r in prefill), prefill
