"""``python -m bench scaling``: the cost model's predictions, the published tables, the quick run."""

from __future__ import annotations

import json

import pytest

from bench import scaling
from bench.scaling import A100_SELENE, MEGATRON_2019, MEGATRON_2021, V100_DGX2H

# Narayanan et al. 2021, Table 1: GPUs, % of peak and aggregate PFLOP/s of each row (the table's other columns)
TABLE_2021_GPUS = (32, 64, 128, 256, 512, 1024, 1536, 1920, 2520, 3072)
TABLE_2021_PEAK_PCT = (44, 44, 46, 43, 44, 45, 47, 50, 52, 52)
TABLE_2021_AGGREGATE_PFLOPS = (4.4, 8.8, 18.2, 34.6, 70.8, 143.8, 227.1, 297.4, 410.2, 502.0)


def test_published_tables_hang_together():
    # 2019: hidden per head 96 (Table 1's caption); model+data parallel = 64 x model parallel GPUs
    assert [r.hidden // r.heads for r in MEGATRON_2019] == [96] * 8
    assert all(r.hidden % r.heads == 0 for r in MEGATRON_2019)
    assert [r.gpus for r in MEGATRON_2019] == [1, 2, 4, 8, 64, 128, 256, 512]
    assert {r.batch // r.dp for r in MEGATRON_2019} == {8}
    for run in MEGATRON_2019 + MEGATRON_2021:  # the parameter counts follow from the shapes
        assert scaling.gpt_params(run) == pytest.approx(run.params_b * 1e9, rel=0.03), run.label
    # 2021: every mesh is whole and the other columns of the table follow from TFLOP/s per GPU
    assert tuple(r.gpus for r in MEGATRON_2021) == TABLE_2021_GPUS
    for run, pct, aggregate in zip(MEGATRON_2021, TABLE_2021_PEAK_PCT, TABLE_2021_AGGREGATE_PFLOPS):
        assert run.gpus % (run.tp * run.pp) == 0 and run.batch % (run.dp * run.micro_batch) == 0
        assert run.heads % run.tp == 0 and run.layers % run.pp == 0
        assert round(100 * run.published / A100_SELENE.peak_flops_per_s) == pct
        assert run.published * run.gpus / 1e15 == pytest.approx(aggregate, rel=0.01)


def test_calibration_reproduces_its_row():
    base = MEGATRON_2021[0]
    rate = scaling.calibrate_matmul_rate(base, A100_SELENE, base.published)
    assert scaling.flops_per_gpu(base, A100_SELENE, rate) == pytest.approx(base.published)
    assert rate < A100_SELENE.peak_flops_per_s
    piped = MEGATRON_2021[4]  # with a pipeline: the bubble shrinks with the rate too
    assert scaling.flops_per_gpu(piped, A100_SELENE, scaling.calibrate_matmul_rate(piped, A100_SELENE, 1e14)) == \
        pytest.approx(1e14)
    with pytest.raises(ValueError, match="more than the model allows"):
        scaling.calibrate_matmul_rate(piped, A100_SELENE, 1e17)


def test_prediction_by_hand():
    # 1.2B on one V100: compute F / rate + the AdamW step (28 bytes per parameter through HBM)
    run = MEGATRON_2019[0]
    rate = 50e12
    t = scaling.predict(run, V100_DGX2H, rate)
    flops = 96 * 8 * 1024 * 40 * 1536**2 * (1 + 1024 / (6 * 1536) + 51200 / (16 * 40 * 1536))
    assert t.compute_s == pytest.approx(flops / rate)
    assert t.optimizer_s == pytest.approx(28 * int(scaling.rank_params(run)) / 900e9)
    assert t.comm_s == 0 and t.bubble_s == 0
    # the same model 64-way data parallel over 4 DGX-2H: hierarchical all-reduce of fp16 gradients,
    # 16 GPUs of a node sharing its 100 GB/s
    dp = scaling.predict(MEGATRON_2019[4], V100_DGX2H, rate)
    assert dp.dp_comm_s == pytest.approx(2 * 63 / 64 * 2 * int(scaling.rank_params(run)) / 100e9)
    # 8.3B, 8-way tensor parallel in one node: 6 all-reduces (recomputation) of 8 x 1024 x 3072 fp16 per layer
    tp = scaling.predict(MEGATRON_2019[3], V100_DGX2H, rate)
    assert tp.tp_comm_s == pytest.approx(6 * 72 * 2 * 7 / 8 * 8 * 1024 * 3072 * 2 / 150e9)


def test_weak_scaling_at_512_gpus_is_near_the_papers():
    rows = list(scaling.megatron_2019_rows())
    largest = rows[-1]
    assert (largest["gpus"], largest["reference"]) == (512, 74.0)
    assert abs(largest["error_pct"]) < 10
    assert rows[0]["role"] == "calibration" and rows[0]["error_pct"] == pytest.approx(0, abs=1e-9)


def test_ring_fit_recovers_latency_and_bandwidth():
    from parallax.planner.calibrate import fit_ring_all_reduce
    from parallax.planner.cost import ring_allreduce_s

    sizes = [1e4, 1e6, 1e8]
    times = [ring_allreduce_s(s, 4, 2e9, 3e-5) for s in sizes]
    latency, bandwidth = fit_ring_all_reduce(sizes, times, 4)
    assert latency == pytest.approx(3e-5) and bandwidth == pytest.approx(2e9)
    with pytest.raises(ValueError, match="two distinct sizes"):
        fit_ring_all_reduce([1e4], [1e-3], 4)


def test_scaling_quick_run(tmp_path, monkeypatch, capsys):
    import bench
    from bench import records
    from bench.runner import main

    monkeypatch.setitem(bench.BENCHMARKS, "scaling", (".scaling", "scaling"))  # until the runner lists it
    assert main(["scaling", "--quick", "--json", "--results-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(records.read_records(tmp_path / "scaling.jsonl")) == len(rows) == 3 + 8 + 10
    suites = {r["suite"] for r in rows}
    assert suites == {"this machine (gloo)", "Megatron-LM 2019 (V100)", "Megatron-LM 2021 (A100)"}
    held_out = [r for r in rows if r["suite"] == "this machine (gloo)" and r["role"] == "prediction"]
    assert len(held_out) == 1 and held_out[0]["reference"] > 0
    assert all(r["predicted"] > 0 for r in rows)
    summary = rows[-1]["notes"]["summary"]
    assert set(summary) == {"Megatron-LM 2019 (V100)", "Megatron-LM 2021 (A100)"}
