"""`parallax train --tp/--pp` and multi-node launch: the same losses and weights as one process,
and clear errors for a mesh that does not fit, before any rank starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from parallax.train import ConfigError, TrainConfig
from parallax.train.checkpoints import load_model
from parallax.train.launch import Launch, torchrun_command
from parallax.train.metrics import read_metrics
from tests.distributed.launch import free_port
from tests.helpers import assert_close

FLAGS = ["--model", "n_layer=4", "--model", "n_head=4", "--model", "n_embd=32", "--block-size", "32",
         "--steps", "4", "--log-interval", "1", "--eval-interval", "4", "--eval-batches", "2",
         "--sample-tokens", "0", "--lr", "3e-3"]


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PARALLAX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "parallax-cache"))


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "parallax", "train", *FLAGS, *args]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*args), capture_output=True, text=True, cwd=cwd, env=dict(os.environ))


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _assert_same_run(a: Path, b: Path) -> None:
    """Losses at every step and the final weights agree (fp32; only summation order differs)."""
    assert len(_losses(a)) == 4
    for x, y in zip(_losses(a), _losses(b)):
        assert abs(x - y) < 2e-5, (_losses(a), _losses(b))
    ma, mb = load_model(a / "checkpoints/step_000004"), load_model(b / "checkpoints/step_000004")
    for (name, p), q in zip(ma.named_parameters(), mb.parameters()):
        assert_close(p, q, atol=2e-5, name=name)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, batch 8."""
    cwd = tmp_path_factory.mktemp("one")
    result = _run("--batch-size", "8", "--out", "one", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "one"


# Plain --tp 2 and --pp 2 with the default 1F1B schedule run in the resume and multi-node tests below; each
# schedule and ZeRO stage is compared element-wise in tests/parallel (in process, much cheaper than a launch).
@pytest.mark.parametrize("mesh", [
    ["--tp", "2", "--nproc", "2", "--batch-size", "8", "--sequence-parallel", "--zero-stage", "3"],
    ["--pp", "2", "--nproc", "2", "--batch-size", "8", "--micro-batches", "2", "--schedule", "interleaved",
     "--virtual-stages", "2"],
], ids=["tp2-sp-zero3", "pp2-interleaved"])
def test_tensor_or_pipeline_parallel_run_matches_one_process(tmp_path, one_process, mesh):
    """--batch-size counts sequences per data-parallel replica: a --tp 2 or --pp 2 run is one replica."""
    result = _run(*mesh, "--out", "par", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(tmp_path / "par", one_process)


def test_tp2_pp2_dp2_on_eight_ranks_matches_one_process(tmp_path, one_process):
    """The full 3-D mesh with ZeRO-1 over the data-parallel pairs: two replicas of batch 4."""
    result = _run("--tp", "2", "--pp", "2", "--nproc", "8", "--zero-stage", "1", "--batch-size", "4",
                  "--micro-batches", "2", "--out", "par", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(tmp_path / "par", one_process)


def test_two_nodes_on_loopback_tensor_parallel_within_pipeline_across(tmp_path, one_process):
    """Two launcher processes (``--nnodes 2 --node-rank R``), 2 ranks each, rendezvous over
    loopback: tp=2 inside each "node", pp=2 across them."""
    port = str(free_port())
    launchers = [subprocess.Popen(_command("--tp", "2", "--pp", "2", "--nproc", "2", "--nnodes", "2",
                                           "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", port,
                                           "--batch-size", "8", "--micro-batches", "2", "--out", "par"),
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in launchers]
    for p, (_, err) in zip(launchers, outputs):
        assert p.returncode == 0, err[-3000:]
    _assert_same_run(tmp_path / "par", one_process)


def test_multi_node_command_uses_a_static_rendezvous():
    cmd = torchrun_command(Launch(nproc=2, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=1234),
                           ["train", "--nproc", "2", "--nnodes=2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                            "--master-port", "1234", "--tp", "2"])
    assert cmd[3:8] == ["--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=1234",
                        "--nproc-per-node=2"]
    assert cmd[-3:] == ["train", "--tp", "2"]  # the ranks learn the launch from torchrun's environment
    assert "--standalone" in torchrun_command(Launch(nproc=2), ["train"])


@pytest.mark.parametrize("flags, message", [
    (dict(tp=3, nproc=2), "tp=3 x pp=1 = 3 ranks does not divide the world size"),
    (dict(tp=2, pp=2, nproc=2), "does not divide the world size nnodes x nproc = 2"),
    (dict(pp=2, nproc=2, zero_stage=3), "zero_stage 3 does not compose with --pp"),
    (dict(pp=2, nproc=2, micro_batches=3, batch_size=8), "micro_batches 3 must divide batch_size 8"),
    (dict(micro_batches=2), "need --pp 2 or more"),
    (dict(tp=2, nproc=2, nnodes=2, node_rank=2), "node_rank must be in 0 .. nnodes-1"),
    (dict(sequence_parallel=True), "needs --tp 2 or more"),
])
def test_mesh_settings_that_cannot_work_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**flags)


@pytest.mark.parametrize("args, message", [
    (["--tp", "2", "--nproc", "2", "--model", "n_head=3", "--model", "n_embd=48"], "n_head"),
    (["--pp", "3", "--nproc", "3", "--model", "n_layer=2"], "n_layer=2"),
    (["--tp", "2", "--nproc", "2", "--preset", "llama-tiny", "--model", "n_kv_head=1"], "n_kv_head"),
])
def test_model_sizes_the_mesh_cannot_split_fail_before_any_rank_starts(tmp_path, args, message):
    result = _run(*args, "--out", "bad", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "torch.distributed.run" not in result.stderr and not (tmp_path / "bad").exists()


def test_fine_tuning_refuses_model_parallelism():
    from parallax.finetune.config import FinetuneConfig

    with pytest.raises(ConfigError, match="tp/pp"):
        FinetuneConfig(base="runs/base", tp=2, nproc=2)


def test_plan_searches_the_mesh_when_data_parallelism_alone_does_not_fit():
    """--plan over 4 ranks: with too little memory for data parallelism the planner splits the
    model (here into pipeline stages), never with ZeRO-3 across stages, and the result is a valid
    config; given explicitly, tp/pp are kept."""
    from parallax.train.planning import resolve_plan

    common = dict(nproc=4, model={"n_layer": 4, "n_head": 4, "n_embd": 128}, batch_size=8)
    roomy = resolve_plan(TrainConfig(**common, plan="1GB"))
    assert (roomy.tp, roomy.pp, roomy.micro_batches) == (1, 1, 1)
    tight = resolve_plan(TrainConfig(**common, plan="3MB"))
    assert tight.tp * tight.pp > 1 and not (tight.pp > 1 and tight.zero_stage == 3), tight
    kept = resolve_plan(TrainConfig(**common, plan="3MB", tp=2), fixed=["tp"])
    assert kept.tp == 2


def test_a_tensor_parallel_checkpoint_resumes_as_a_pipeline(tmp_path, one_process):
    """Saved at (pp=1, dp=1, tp=2) -- GPT's fused q/k/v split by heads within each section, the
    257-id vocabulary split unevenly -- and resumed at (pp=2, dp=1, tp=1): the run continues as
    the uninterrupted one-process run (weights and Adam moments resharded)."""
    first = _run("--tp", "2", "--nproc", "2", "--batch-size", "8", "--steps", "2", "--checkpoint-interval", "2",
                 "--out", "run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    rest = _run("--pp", "2", "--nproc", "2", "--batch-size", "8", "--micro-batches", "2", "--out", "run",
                "--resume", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr[-3000:]
    _assert_same_run(tmp_path / "run", one_process)
