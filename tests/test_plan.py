"""px.planner: predicted peaks against measured CPU peaks, the choice of configuration, bad input.

Measured peaks come from ``CpuMemoryProfile`` (torch.profiler memory events: every allocation and
free of torch's CPU allocator) over one steady-state step of a real model in a world-size-1 gloo
group; the planner predicts the same step with ``backend="gloo"``. Multi-rank comparisons run in
``python -m bench memory`` (tests/bench/test_memory_bench.py).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from parallax.models import GPT, GPTConfig, LlamaConfig, build_model

import parallax as px
from parallax.planner import (
    CpuMemoryProfile,
    Hardware,
    format_bytes,
    parse_bytes,
    plan,
    plan_main,
    zero_formula_bytes,
)
from parallax.planner.search import TIE
from parallax.planner.trace import trace_step

TOLERANCE = 0.15  # the bound on |predicted - measured| / measured

MODELS = {
    "tiny": (GPTConfig.from_preset("tiny"), 4, 128),
    "small": (GPTConfig.from_preset("tiny", n_layer=6, n_embd=256, block_size=256), 4, 256),
    "llama-tiny": (LlamaConfig.from_preset("llama-tiny"), 4, 128),
    "qwen3-tiny": (LlamaConfig.from_preset("qwen3-tiny"), 4, 128),
}


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _gpt_loss(model, x, y):
    return model(x, y)


def measure(build, vocab: int, batch: int, seq: int, stage: int, precision: str, offload: str = "none",
            checkpointing: str = "none", loss_fn=_gpt_loss) -> tuple[int, dict]:
    """Peak bytes of one steady-state training step, and ``memory_report`` just before it."""
    prof = CpuMemoryProfile()
    gen = torch.Generator().manual_seed(0)
    with prof:
        torch.manual_seed(0)
        model = build()
        config = px.RuntimeConfig(zero_stage=stage, precision=precision, offload=offload,
                                  activation_checkpointing=False if checkpointing == "none" else checkpointing)
        model, opt = px.initialize(model, config, lr=1e-3)

        def step() -> None:
            x = torch.randint(0, vocab, (batch, seq), generator=gen)
            y = torch.randint(0, vocab, (batch, seq), generator=gen)
            loss = loss_fn(model, x, y)
            opt.backward(loss)
            del loss
            opt.step()
            opt.zero_grad()

        step()  # the optimizer state appears in the first step
        report = px.zero.memory_report(model, opt)
        with prof.window("step"):
            step()
    return prof.peak("step")[0], report


def predict(model, batch: int, seq: int, stage: int, precision: str, offload: str = "none",
            checkpointing: str = "none", **kwargs):
    p = plan(model, 1, "1TiB", seq, batch, stages=(stage,), precisions=(precision,), offloads=(offload,),
             checkpointing=(checkpointing,), backend="gloo", **kwargs)
    (estimate,) = p.estimates
    return estimate


CASES = [
    ("tiny", 0, "fp32", "none", "none"),
    ("tiny", 0, "fp32", "none", "block"),
    ("tiny", 0, "bf16", "none", "none"),
    ("tiny", 0, "bf16", "none", "block"),
    ("tiny", 1, "fp32", "cpu", "none"),
    ("tiny", 2, "bf16", "none", "block"),
    ("tiny", 3, "fp32", "none", "none"),
    ("tiny", 3, "bf16", "cpu", "block"),
    ("small", 0, "fp32", "none", "none"),
    ("small", 0, "fp32", "none", "block"),
    ("small", 0, "bf16", "none", "none"),
    ("small", 3, "bf16", "none", "block"),
    ("llama-tiny", 0, "fp32", "none", "none"),
    ("llama-tiny", 3, "bf16", "none", "block"),
    ("qwen3-tiny", 2, "fp32", "none", "block"),
]


@pytest.mark.parametrize("name,stage,precision,offload,checkpointing", CASES)
def test_predicted_peak_matches_measured(group, name, stage, precision, offload, checkpointing):
    config, batch, seq = MODELS[name]
    measured, report = measure(lambda: build_model(config), config.vocab_size, batch, seq, stage, precision, offload,
                               checkpointing)
    est = predict(config, batch, seq, stage, precision, offload, checkpointing)
    predicted = est.peak_bytes + est.host_bytes  # on CPU the host memory is the same memory
    err = (predicted - measured) / measured
    assert abs(err) <= TOLERANCE, (f"{name} {est.label}: predicted {format_bytes(predicted)}, measured "
                                   f"{format_bytes(measured)} ({100 * err:+.1f}%)")
    # model states between steps are exact, padding included
    assert est.param_bytes == report["param_bytes"]
    assert est.grad_bytes == report["grad_bytes"]
    if offload == "none":
        assert est.optimizer_bytes == report["optimizer_bytes"]
    else:
        assert est.optimizer_bytes == 0 and est.host_bytes > report["optimizer_bytes"]  # + staging slots


def test_math_attention_and_its_attention_matrix(group):
    config = GPTConfig.from_preset("tiny", attention="math")
    measured, _ = measure(lambda: GPT(config), config.vocab_size, 4, 128, 0, "fp32")
    est = predict(config, 4, 128, 0, "fp32")
    assert abs(est.peak_bytes - measured) <= TOLERANCE * measured
    sdpa = predict(GPTConfig.from_preset("tiny"), 4, 128, 0, "fp32")
    # math keeps the (B, nh, T, T) softmax; the fused kernel keeps its output and log-sum-exp
    assert est.activation_bytes > sdpa.activation_bytes + 4 * 4 * 128 * 128 * 4 * 4


def test_hugging_face_gpt2(group):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=64)

    def build():
        return transformers.GPT2LMHeadModel(hf_config)

    def hf_loss(model, x, y):
        return model(input_ids=x, labels=y).loss

    measured, _ = measure(build, 257, 4, 64, 0, "fp32", loss_fn=hf_loss)
    torch.manual_seed(0)
    est = predict(build(), 4, 64, 0, "fp32")
    assert abs(est.peak_bytes - measured) <= TOLERANCE * measured, (est.peak_bytes, measured)


def test_planning_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    p = plan(model, 2, "1GB", 64, 2, precisions=("bf16",))
    assert p.best is not None
    for n, q in model.named_parameters():
        assert q.dtype == torch.float32 and q.grad is None and torch.equal(q, before[n])
    with torch.device("meta"):
        meta = GPT(GPTConfig.from_preset("tiny"))
    same = plan(meta, 2, "1GB", 64, 2, precisions=("bf16",))
    assert [e.peak_bytes for e in same.estimates] == [e.peak_bytes for e in p.estimates]


def test_a_checkpointed_model_is_planned_with_and_without_checkpointing():
    model = px.checkpoint.activation(GPT(GPTConfig.from_preset("tiny")), "block")
    p = plan(model, 2, "1GB", 128, 4, stages=(0,), precisions=("fp32",))
    fresh = plan("tiny", 2, "1GB", 128, 4, stages=(0,), precisions=("fp32",))
    assert [e.peak_bytes for e in p.estimates] == [e.peak_bytes for e in fresh.estimates]
    assert p.find(0, "fp32", "none", "block").activation_bytes * 4 < p.find(0, "fp32").activation_bytes


def test_a_forward_that_cannot_be_traced_says_so():
    class DataDependent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)

        def forward(self, idx):
            h = self.emb(idx)
            return h.sum() if h.sum().item() > 0 else -h.sum()

    with pytest.raises(RuntimeError, match="could not trace"):
        plan(DataDependent(), 1, "1GB", 8, 1)
    p = plan(DataDependent(), 1, "1GB", 8, 1, loss_fn=lambda m, idx, y: m.emb(idx).sum(), checkpointing="none")
    assert p.best is not None


def test_trace_counts_checkpointing_savings_and_recompute():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("tiny"))
    plain = trace_step(model, 4, 128)
    ckpt = trace_step(model, 4, 128, checkpointing="block")
    assert ckpt.saved_bytes * 4 < plain.saved_bytes
    assert 1.1 < ckpt.flops / plain.flops < 1.4  # the forward of every block runs again
    half = trace_step(model, 4, 128, dtype=torch.bfloat16)
    assert 0.45 < half.saved_bytes / plain.saved_bytes < 0.55


# -------------------------------------------------------------------------------- the choice


def test_fits_follows_the_usable_memory():
    p = plan("tiny", 2, "1GB", 128, 4)
    assert p.usable_bytes == int(1e9 * 0.9)
    assert len(p.estimates) == (4 * 2 - 1) * 3 * 2  # stages x offload (no stage 0 + cpu) x precisions x ckpt
    for e in p.estimates:
        assert e.fits == (e.peak_bytes <= p.usable_bytes)
        assert not (e.zero_stage == 0 and e.offload == "cpu")
    assert any("stage 0 + offload" in n for n in p.notes)


def test_best_is_the_fastest_that_fits_and_ties_go_to_the_simplest():
    p = plan("tiny", 2, "1GB", 128, 4)
    fastest = min(e.step_time_s for e in p.fitting())
    assert p.best.fits and p.best.step_time_s <= fastest * (1 + TIE)
    assert p.best.precision == "bf16"  # half the compute and communication of fp32; fp16 ties and loses
    # one rank: no communication, and every stage updates all parameters: stages tie, stage 0 wins
    single = plan("tiny", 1, "1GB", 128, 4)
    assert (single.best.zero_stage, single.best.offload, single.best.checkpointing) == (0, "none", "none")


def test_less_memory_picks_a_leaner_configuration():
    roomy = plan("tiny", 2, "1GB", 128, 8)
    best = roomy.best
    device = int((best.peak_bytes - 1) / (1 - 0.10))
    tight = plan("tiny", 2, device, 128, 8)
    assert tight.best is not None
    assert tight.best.peak_bytes < best.peak_bytes <= device
    assert tight.best.step_time_s >= best.step_time_s
    assert not tight.find(best.zero_stage, best.precision, best.offload, best.checkpointing).fits


def test_nothing_fits():
    p = plan("tiny", 1, "1MB", 128, 4)
    assert p.best is None and not p.fitting()
    assert "nothing fits" in p.table()


def test_a_large_model_needs_sharding():
    # 10B parameters on 64 ranks of 16 GB: replicated states (16 bytes/param) cannot fit
    p = plan(10_000_000_000, 64, "16GB", layers=80)
    assert not p.activations_known and all(e.activation_bytes is None for e in p.estimates)
    assert all(not e.fits for e in p.estimates if e.zero_stage in (0, 1))
    assert p.best is not None and p.best.zero_stage == 3
    assert {e.checkpointing for e in p.estimates} == {"none"}


def test_offload_wins_when_only_the_host_has_room():
    p = plan("gpt2", 2, "1.2GiB", 256, 1, precisions=("bf16",), checkpointing=("block",))
    fitting = p.fitting()
    assert fitting and all(e.offload == "cpu" for e in fitting)
    assert p.best.offload == "cpu" and p.best.host_bytes > 0 and p.best.optimizer_bytes == 0


def test_hardware_rates_rank_the_candidates():
    slow_net = plan("tiny", 8, "1GB", 128, 4, precisions=("bf16",), checkpointing=("none",),
                    hardware=Hardware(network_bytes_per_s=1e6))
    assert slow_net.find(3, "bf16").comm_s > slow_net.find(2, "bf16").comm_s * 1.4
    assert slow_net.best.zero_stage != 3
    with pytest.raises(ValueError, match="network_bytes_per_s"):
        Hardware(network_bytes_per_s=0)


def test_model_states_follow_the_zero_formula():
    psi = 1_000_000
    p = plan(psi, 1, "1GB", precisions=("fp32", "bf16"), offloads=("none",))
    for e in p.estimates:
        assert e.param_bytes + e.grads_after_backward + e.optimizer_bytes == e.formula_bytes
    assert p.find(0, "fp32").formula_bytes == 16 * psi
    assert p.find(0, "bf16").formula_bytes == 16 * psi  # 2 + 2 + 12
    assert zero_formula_bytes(3, "bf16", "none", psi, 4) == 16 * psi // 4
    assert zero_formula_bytes(1, "fp32", "cpu", psi, 4) == 8 * psi  # optimizer state on the host
    n8 = plan(8 * psi, 8, "1GB", precisions=("bf16",), offloads=("none",), layers=4)
    assert n8.find(3, "bf16").formula_bytes == 16 * psi
    assert n8.find(3, "bf16").param_bytes == 2 * psi  # b Psi / N, no padding at these sizes


def test_runtime_config_of_an_estimate():
    p = plan("tiny", 2, "1GB", 128, 4, bucket_mb=10, prefetch=2)
    config = p.best.runtime_config(timeout_s=30)
    assert (config.zero_stage, config.precision, config.offload, config.bucket_mb, config.prefetch,
            config.timeout_s) == (p.best.zero_stage, p.best.precision, p.best.offload, 10, 2, 30)
    assert p.find(2, "bf16", "cpu", "block").runtime_config().activation_checkpointing == "block"
    assert p.find(2, "bf16", "cpu", "none").runtime_config().activation_checkpointing is False


# -------------------------------------------------------------------------------- input


@pytest.mark.parametrize("text,expected", [
    ("16GB", 16 * 10**9), ("16GiB", 16 * 2**30), ("512MB", 512 * 10**6), ("512MiB", 512 * 2**20),
    ("16G", 16 * 2**30), ("1.5 GiB", 3 * 2**29), ("80e9", 80 * 10**9), ("81559MiB", 81559 * 2**20),
    ("2tb", 2 * 10**12), (17179869184, 2**34), (1e9, 10**9),
])
def test_memory_sizes_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["16XB", "", "GB", "-1GB", "0", "16 G B", 0, -5, True, None, float("inf")])
def test_bad_memory_sizes_name_the_argument(bad):
    with pytest.raises(ValueError, match="device_bytes"):
        parse_bytes(bad)
    with pytest.raises(ValueError, match="device_bytes"):
        plan("tiny", 1, bad)


@pytest.mark.parametrize("kwargs,match", [
    (dict(world_size=0), "world_size"),
    (dict(world_size=-2), "world_size"),
    (dict(micro_batch=0), "micro_batch"),
    (dict(seq_len=-1), "seq_len"),
    (dict(model_or_num_params="gpt5"), "unknown preset 'gpt5'"),
    (dict(model_or_num_params=-5), "model_or_num_params"),
    (dict(model_or_num_params=object()), "model_or_num_params"),
    (dict(model_or_num_params=True), "model_or_num_params"),
    (dict(stages=(4,)), "stages"),
    (dict(precisions=("fp8",)), "precisions"),
    (dict(offloads=("disk",)), "offloads"),
    (dict(checkpointing=("every_n:0",)), "checkpointing"),
    (dict(backend="mpi"), "backend"),
    (dict(margin=1.0), "margin"),
    (dict(bucket_mb=0), "bucket_mb"),
    (dict(prefetch=-1), "prefetch"),
    (dict(seq_len=1000), "block_size"),
])
def test_bad_arguments_raise_value_errors_naming_them(kwargs, match):
    args = dict(model_or_num_params="tiny", world_size=2, device_bytes="1GB", seq_len=64, micro_batch=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        plan(**args)


# -------------------------------------------------------------------------------- parallax plan


def test_cli_prints_the_table(capsys):
    assert plan_main(["--preset", "tiny", "--world-size", "2", "--device-memory", "1GB", "--micro-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "best: stage" in out and "peak/rank" in out and "ZeRO formula" in out
    assert len([line for line in out.splitlines() if line.startswith(("0 ", "1 ", "2 ", "3 "))]) == 42


def test_cli_json_and_exit_codes(capsys):
    assert plan_main(["--params", "7e9", "--world-size", "64", "--device-memory", "16GB", "--layers", "32",
                      "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["best"]["zero_stage"] == 3 and out["num_params"] == 7_000_000_000
    assert plan_main(["--preset", "tiny", "--device-memory", "1MB"]) == 1
    assert "nothing fits" in capsys.readouterr().out
    assert plan_main(["--preset", "tiny", "--device-memory", "16XB"]) == 2
    assert "device_bytes" in capsys.readouterr().err
    assert plan_main(["--preset", "gpt5", "--device-memory", "16GB"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert plan_main(["--preset", "tiny", "--model", "n_layer=2", "--seq-len", "64", "--device-memory", "1GB",
                      "--stages", "3", "--precisions", "bf16", "--offload", "none",
                      "--checkpointing", "every_n:2"]) == 0
    assert "every_n:2" in capsys.readouterr().out


def test_parallax_plan_command_for_gpt2_on_8_ranks(capsys):
    from parallax.cli import main

    assert main(["plan", "--preset", "gpt2", "--world-size", "8", "--device-memory", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "124.4M parameters, 8 rank(s)" in out and "<- best" in out
    assert main(["plan", "--preset", "gpt2", "--world-size", "8", "--device-memory", "sixteen"]) == 2


def test_device_memory_auto():
    import os

    from parallax.planner import device_memory_bytes

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert device_memory_bytes("cpu", local_ranks=1) == ram
    assert device_memory_bytes("cpu", local_ranks=4) == ram // 4
    if not torch.cuda.is_available():
        assert plan("tiny", 1, "auto").device_bytes == ram
        with pytest.raises(ValueError, match="no CUDA device"):
            device_memory_bytes("cuda")


# -------------------------------------------------------------------------------- wiring


def test_initialize_takes_a_plan(group):
    p = px.plan("tiny", 1, "1GB", 64, 2, precisions=("fp32",), offloads=("none",))
    model, opt = px.initialize(GPT(GPTConfig.from_preset("tiny", block_size=64)), p, lr=1e-3)
    assert px.zero.module.zero_state(model).stage == p.best.zero_stage
    loss = model(torch.zeros(2, 64, dtype=torch.long), torch.zeros(2, 64, dtype=torch.long))
    opt.backward(loss)
    opt.step()
    nothing = px.plan("tiny", 1, "1MB", 64, 2)
    with pytest.raises(ValueError, match="no configuration that fits"):
        px.initialize(GPT(GPTConfig.from_preset("tiny", block_size=64)), nothing)
    with pytest.raises(TypeError, match="config must be a px.RuntimeConfig"):
        px.initialize(GPT(GPTConfig.from_preset("tiny", block_size=64)), {"zero_stage": 1})


def _train_config(argv):
    import argparse

    from parallax.train.arguments import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_train_plan_picks_the_memory_fields_and_keeps_the_explicit_ones(tmp_path, monkeypatch):
    from parallax.train import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    base = ["--batch-size", "16", "--nproc", "2", "--device", "cpu"]
    # 40MB per rank: the tiny GPT at 16 x 128 tokens needs checkpointing or a leaner precision
    cfg = _train_config(base + ["--plan", "40MB"])
    expected = px.plan("tiny", 2, "40MB", 128, 16, precisions=("fp32", "bf16"), backend="gloo").best
    assert cfg.plan == "off"
    assert (cfg.zero_stage, cfg.precision, cfg.offload) == (expected.zero_stage, expected.precision, expected.offload)
    assert cfg.activation_checkpointing == ("off" if expected.checkpointing == "none" else expected.checkpointing)
    kept = _train_config(base + ["--plan", "40MB", "--precision", "fp32"])
    assert kept.precision == "fp32" and kept.activation_checkpointing == "block"
    config_file = tmp_path / "run.toml"
    config_file.write_text('plan = "40MB"\nzero_stage = 3\n')
    from_file = _train_config(base + ["--config", str(config_file)])
    assert from_file.zero_stage == 3
    with pytest.raises(ConfigError, match="no configuration"):
        _train_config(base + ["--plan", "2MB"])
    with pytest.raises(ConfigError, match="plan"):
        _train_config(base + ["--plan", "lots"])


# -------------------------------------------------------------------------------- tensor / pipeline parallelism


def test_ring_all_reduce_and_bubble_formulas():
    from parallax.planner.cost import bubble_fraction, ring_allreduce_s

    # 2 (n-1)/n of the bytes at the link's rate: 2 * 3/4 * 1 GB / 100 GB/s
    assert ring_allreduce_s(1e9, 4, 100e9) == pytest.approx(0.015)
    assert ring_allreduce_s(1e9, 4, 100e9, latency_s=1e-5) == pytest.approx(0.015 + 6e-5)  # 2 (n-1) steps
    assert ring_allreduce_s(1e9, 1, 100e9) == 0.0
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15)  # (p-1) / (m+p-1)
    assert bubble_fraction(4, 12, virtual_stages=2) == pytest.approx(3 / 27)  # (p-1) / (v m+p-1)
    assert bubble_fraction(1, 5) == 0.0


def test_tensor_parallel_communication_formula():
    from parallax.planner.cost import tensor_parallel_comm_s

    hw = Hardware(network_bytes_per_s=100e9, inter_node_bytes_per_s=10e9, ranks_per_node=8)
    # one all-reduce: 2048 tokens x 1024 wide x 2 bytes = 4 MiB, ring over 2: 2 * 1/2 * 4 MiB / 100 GB/s
    one = 2048 * 1024 * 2 / 100e9
    assert tensor_parallel_comm_s(tokens=2048, hidden=1024, layers=4, tp=2, element_size=2, hw=hw) == \
        pytest.approx(4 * 4 * one)  # 2 in forward + 2 in backward per layer
    assert tensor_parallel_comm_s(tokens=2048, hidden=1024, layers=4, tp=2, element_size=2, hw=hw,
                                  recompute=True) == pytest.approx(6 * 4 * one)  # + the recomputed forward's 2
    # 16-way spans two nodes: the inter-node link
    assert tensor_parallel_comm_s(tokens=2048, hidden=1024, layers=1, tp=16, element_size=2, hw=hw) == \
        pytest.approx(4 * 2 * 15 / 16 * 2048 * 1024 * 2 / 10e9)


def test_step_time_of_a_mesh():
    from parallax.planner.cost import step_time

    hw = Hardware(bf16_flops_per_s=400e12, network_bytes_per_s=100e9, inter_node_bytes_per_s=10e9,
                  memory_bytes_per_s=1e12, ranks_per_node=8)
    t = step_time(flops=8e12, num_params=10**9, world_size=4, stage=1, element_size=2, offload="none", hw=hw,
                  tp=2, pp=2, micro_batches=4, tokens=4096, hidden=2048, layers=8)
    assert t.compute_s == pytest.approx(4 * 8e12 / 4 / 400e12)  # m micro-batches, 1/(tp pp) of each
    ar = 2 * 1 / 2 * 4096 * 2048 * 2 / 100e9
    assert t.tp_comm_s == pytest.approx(4 * 4 * (8 // 2) * ar)  # m x 4 all-reduces x the stage's 4 layers
    # 2 transfers (activations on, gradients back) per micro-batch; 16 ranks span 2 nodes
    assert t.p2p_s == pytest.approx(2 * 4 * 4096 * 2048 * 2 / 10e9)
    assert t.bubble_s == pytest.approx((t.compute_s + t.tp_comm_s) * 1 / 4)  # (p-1)/m of the busy time
    # the data-parallel group (tp x dp = 8 consecutive ranks) stays in the node
    assert t.dp_comm_s == pytest.approx(2 * 3 / 4 * 2 * 10**9 / 100e9)
    assert t.optimizer_s == pytest.approx(28 * 10**9 / 4 / 1e12)
    assert t.total_s == pytest.approx(t.compute_s + t.bubble_s + t.tp_comm_s + t.p2p_s + t.dp_comm_s + t.optimizer_s)
    wide = step_time(flops=8e12, num_params=10**9, world_size=8, stage=1, element_size=2, offload="none", hw=hw,
                     tp=2, pp=2, micro_batches=4, tokens=4096, hidden=2048, layers=8)
    # 16 ranks span 2 nodes: hierarchical, each rank's share of 1/4 goes over its 10 GB/s NIC
    assert wide.dp_comm_s == pytest.approx(2 * 7 / 8 * 2 * 10**9 / (4 * 10e9))


def test_gpt_flops_match_megatron_formula():
    from parallax.planner.cost import gpt_step_flops

    b, s, layers, h, vocab = 8, 2048, 24, 2304, 51200
    megatron = 96 * b * s * layers * h**2 * (1 + s / (6 * h) + vocab / (16 * layers * h))
    assert gpt_step_flops(batch=b, seq=s, layers=layers, hidden=h, vocab=vocab, recompute=True) == \
        pytest.approx(megatron)
    # the planner's trace counts the same matmuls for a GPT without recomputation (3 x forward)
    config = GPTConfig.from_preset("tiny")
    with torch.device("meta"):
        model = GPT(config)
    traced = trace_step(model, 4, 128)
    assert traced.flops == pytest.approx(gpt_step_flops(batch=4, seq=128, layers=config.n_layer, hidden=config.n_embd,
                                                        vocab=config.vocab_size), rel=0.02)


def test_activation_factors_and_micro_batches_in_flight():
    from parallax.planner.partition import micro_batches_in_flight, tp_activation_factor

    assert tp_activation_factor(1) == 1.0
    assert tp_activation_factor(2) == pytest.approx((10 + 12) / 34)  # Korthikanti et al. 2022, Table 2
    assert tp_activation_factor(8, sequence_parallel=True) == pytest.approx(1 / 8)
    assert micro_batches_in_flight("gpipe", 4, 16) == 16
    assert micro_batches_in_flight("1f1b", 4, 16) == 4
    assert micro_batches_in_flight("1f1b", 4, 2) == 2
    assert micro_batches_in_flight("interleaved", 4, 16, virtual_stages=2) == pytest.approx(4 + 3 / 2)
    assert micro_batches_in_flight("1f1b", 1, 16) == 1  # gradient accumulation: one at a time
    with pytest.raises(ValueError, match="schedule"):
        micro_batches_in_flight("zigzag", 2, 4)


def test_degrees_must_divide_heads_layers_and_world():
    from parallax.planner.partition import ModelDims, pp_candidates, tp_candidates

    dims = ModelDims(n_layer=12, n_head=12, n_kv_head=4, hidden=768)
    assert tp_candidates("auto", 16, dims)[0] == [1, 2, 4]  # 8 and 16 do not divide 4 KV heads
    assert pp_candidates("auto", 16, dims)[0] == [1, 2, 4]  # 8 and 16 do not divide 12 layers
    kept, why = tp_candidates((1, 3), 6, dims)
    assert kept == [1] and why == ["tp=3 does not divide the 12 heads and 4 KV heads"]
    args = dict(model_or_num_params="tiny", world_size=4, device_bytes="1GB", seq_len=64, micro_batch=4,
                stages=(0,), precisions=("fp32",), checkpointing=("none",))
    with pytest.raises(ValueError, match="tp=3 does not divide the world size 4"):
        plan(**args, tp=3)
    with pytest.raises(ValueError, match="tp=4 does not divide the 2 heads"):
        plan(**dict(args, model_or_num_params=GPTConfig.from_preset("tiny", n_head=2)), tp=4)
    with pytest.raises(ValueError, match="pp=4 does not divide the 2 layers"):
        plan(**dict(args, model_or_num_params=GPTConfig.from_preset("tiny", n_layer=2)), pp=4)
    with pytest.raises(ValueError, match="micro_batches: 3 does not divide micro_batch=4"):
        plan(**args, pp=2, micro_batches=3)
    with pytest.raises(ValueError, match="needs the model's heads"):
        plan(10**6, 4, "1GB", tp=2)
    with pytest.raises(ValueError, match="tp must be"):
        plan(**args, tp=0)
    with pytest.raises(ValueError, match="interleaved"):
        plan(**args, pp=2, schedule="interleaved")


def _mesh_plan(**kwargs):
    args = dict(stages=(0,), precisions=("fp32",), offloads=("none",), checkpointing=("none",))
    args.update(kwargs)
    return plan(GPTConfig.from_preset("tiny", n_layer=4), 4, args.pop("device", "1TB"), 64, 8, **args)


def test_mesh_memory_splits_matrices_and_layers():
    config = GPTConfig.from_preset("tiny", n_layer=4)
    with torch.device("meta"):
        model = GPT(config)
    named = dict(model.named_parameters())
    blocks = {n: p.numel() for n, p in named.items() if ".h." in n}
    root = {n: p.numel() for n, p in named.items() if ".h." not in n}
    p = _mesh_plan(tp=(1, 2), pp=(1, 2), micro_batches=(1, 2))
    base = p.find(0, "fp32")
    tp2 = p.find(0, "fp32", tp=2)
    # matrices split by rows (the larger half on the worst rank), vectors and position embeddings kept
    sharded = sum(-(-q.shape[0] // 2) * q[0].numel() if q.dim() >= 2 and "wpe" not in k else q.numel()
                  for k, q in named.items())
    assert tp2.param_bytes == pytest.approx(4 * sharded, rel=1e-3)  # matrices halved, vectors kept
    assert tp2.formula_bytes == zero_formula_bytes(0, "fp32", "none", sharded, 2)
    pp2 = p.find(0, "fp32", pp=2, micro_batches=2)
    first_half = sum(n for k, n in blocks.items() if k.split(".h.")[1].split(".")[0] in ("0", "1"))
    assert pp2.param_bytes == pytest.approx(4 * (first_half + sum(root.values())), rel=1e-3)
    assert (base.dp, tp2.dp, pp2.dp) == (4, 2, 2)
    # activations: 1 of 2 micro-batches of half the batch on half the layers, the other one's too in flight
    half = p.find(0, "fp32", micro_batches=2)
    assert pp2.activation_bytes == pytest.approx(2 * half.activation_bytes / 2, rel=0.01)
    assert tp2.activation_bytes == pytest.approx(base.activation_bytes * (10 + 24 / 2) / 34, rel=0.01)
    assert tp2.runtime_config().zero_stage == 0 and (tp2.tp, tp2.pp, tp2.micro_batches) == (2, 1, 1)
    assert "tp2 pp1 m1" in tp2.label


def test_gpipe_holds_every_micro_batch_1f1b_at_most_pp():
    gpipe = _mesh_plan(pp=2, micro_batches=4, schedule="gpipe").find(0, "fp32", pp=2, micro_batches=4)
    one_f_one_b = _mesh_plan(pp=2, micro_batches=4).find(0, "fp32", pp=2, micro_batches=4)
    assert gpipe.activation_bytes == pytest.approx(2 * one_f_one_b.activation_bytes, rel=0.01)  # 4 vs 2 in flight
    assert gpipe.step_time_s == pytest.approx(one_f_one_b.step_time_s)  # the same bubble
    interleaved = _mesh_plan(pp=2, micro_batches=4, schedule="interleaved", virtual_stages=2).find(
        0, "fp32", pp=2, micro_batches=4)
    assert interleaved.bubble_s == pytest.approx(one_f_one_b.bubble_s / 2)


def test_search_picks_tensor_or_pipeline_parallelism_when_nothing_else_fits():
    everything = _mesh_plan(tp="auto", pp="auto", micro_batches="auto", stages=(0, 3))
    plain = min(e.peak_bytes for e in everything.estimates if not e.has_mesh)
    split = min(e.peak_bytes for e in everything.estimates if e.tp * e.pp > 1)
    assert split < plain
    device = int((plain - 1) / 0.9)
    tight = _mesh_plan(tp="auto", pp="auto", micro_batches="auto", stages=(0, 3), device=device)
    assert all(not e.fits for e in tight.estimates if not e.has_mesh)
    assert tight.best is not None and tight.best.tp * tight.best.pp > 1
    assert tight.best.peak_bytes <= tight.usable_bytes
    table = tight.table()
    assert table.splitlines()[1].startswith("tp  pp  m  dp") and "<- best" in table


def test_cli_searches_the_mesh(capsys):
    assert plan_main(["--preset", "tiny", "--world-size", "4", "--device-memory", "1GB", "--micro-batch", "4",
                      "--seq-len", "64", "--tp", "auto", "--pp", "1,2", "--micro-batches", "auto", "--stages", "0",
                      "--precisions", "fp32", "--offload", "none", "--checkpointing", "none"]) == 0
    out = capsys.readouterr().out
    assert "tp  pp  m  dp" in out
    assert plan_main(["--preset", "tiny", "--world-size", "4", "--device-memory", "1GB", "--tp", "3"]) == 2
    assert "tp=3" in capsys.readouterr().err
