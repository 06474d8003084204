"""`parallax train`: learning, outputs, bit-exact resume, multi-process parity, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallax.train import ConfigError, TrainConfig, train
from parallax.train.checkpoints import list_checkpoints, load_model
from parallax.train.metrics import read_metrics
from tests.helpers import assert_close

# Small enough for a few seconds per run on 2 cores, big enough to learn visibly.
SMALL_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64}
SMALL = dict(model=SMALL_MODEL, block_size=64, batch_size=8, eval_batches=4, sample_tokens=16)


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PARALLAX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "parallax-cache"))


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "parallax", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_training_learns_and_writes_its_outputs(tmp_path):
    out = tmp_path / "run"
    result = train(TrainConfig(**SMALL, steps=80, lr=3e-3, eval_interval=40, log_interval=10,
                               checkpoint_interval=40, out=str(out)), progress=False)
    assert result.initial_val_loss > 5.0  # ~ln 257 for an untrained byte model
    assert result.val_loss < result.initial_val_loss - 1.5, (result.initial_val_loss, result.val_loss)
    records = read_metrics(out / "metrics.jsonl")
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(10, 81, 10))
    assert all(r["tokens_per_s"] > 0 and "lr" in r for r in logged)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 40, 80]
    assert (out / "loss.png").stat().st_size > 0
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [40, 80]
    assert not list((out / "checkpoints").glob(".*")), "temporary directories left behind"
    assert isinstance(result.sample, str) and result.sample.startswith("The ")
    # The final checkpoint is a loadable model.
    model = load_model(out / "checkpoints/step_000080")
    assert model.config.n_layer == 2


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path):
    common = dict(**SMALL, steps=20, log_interval=1, eval_interval=10, checkpoint_interval=10, lr=3e-3)
    train(TrainConfig(**common, out=str(tmp_path / "full")), progress=False)

    class Crash(Exception):
        pass

    def crash_at_13(step, record):
        if step == 13:
            raise Crash

    with pytest.raises(Crash):
        train(TrainConfig(**common, out=str(tmp_path / "split")), progress=False, on_step=crash_at_13)
    # Steps 11-12 were logged after the checkpoint at 10; the resumed run replaces them.
    train(TrainConfig(**common, out=str(tmp_path / "split"), resume=True), progress=False)

    full = read_metrics(tmp_path / "full/metrics.jsonl")
    split = read_metrics(tmp_path / "split/metrics.jsonl")
    assert [r["step"] for r in split] == [r["step"] for r in full]
    for a, b in zip(full, split):
        assert a.get("loss") == b.get("loss") and a.get("val_loss") == b.get("val_loss"), (a, b)
    final_full = load_model(tmp_path / "full/checkpoints/step_000020")
    final_split = load_model(tmp_path / "split/checkpoints/step_000020")
    for (name, p), q in zip(final_full.named_parameters(), final_split.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, zero_stage):
    """--nproc 2 (gloo) with batch 4 each == 1 process with batch 8, for plain data parallelism
    (stage 0, gradient all-reduce) and fully sharded ZeRO-3; each rank reports its memory."""
    flags = ["--model", "n_layer=2", "--model", "n_head=2", "--model", "n_embd=64", "--block-size", "64",
             "--steps", "6", "--log-interval", "1", "--eval-interval", "6", "--eval-batches", "2",
             "--sample-tokens", "0", "--grad-clip", "0"]
    two = _run_cli("train", *flags, "--nproc", "2", "--zero-stage", str(zero_stage), "--batch-size", "4",
                   "--out", "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    for rank in (0, 1):
        assert f"memory, rank {rank} of 2 (ZeRO stage {zero_stage})" in two.stderr, two.stderr[-2000:]
    one = _run_cli("train", *flags, "--batch-size", "8", "--out", "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    losses = lambda d: [r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert len(losses("two")) == 6
    for a, b in zip(losses("two"), losses("one")):
        assert abs(a - b) < 1e-5, (losses("two"), losses("one"))
    m2 = load_model(tmp_path / "two/checkpoints/step_000006")
    m1 = load_model(tmp_path / "one/checkpoints/step_000006")
    for (name, p), q in zip(m2.named_parameters(), m1.parameters()):
        assert_close(p, q, atol=1e-5, name=name)


def test_resume_with_another_process_count_and_stage(tmp_path):
    """A checkpoint of 2 ranks at ZeRO-2 resumes in 1 process at stage 0 and continues the same
    training as an uninterrupted single-process run (sharded checkpoints reshard)."""
    flags = ["--model", "n_layer=2", "--model", "n_head=2", "--model", "n_embd=64", "--block-size", "64",
             "--steps", "8", "--log-interval", "1", "--eval-interval", "8", "--eval-batches", "2",
             "--sample-tokens", "0", "--checkpoint-interval", "4"]
    ref = _run_cli("train", *flags, "--batch-size", "8", "--out", "ref", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    half = _run_cli("train", *flags, "--steps", "4", "--nproc", "2", "--zero-stage", "2", "--batch-size", "4",
                    "--out", "run", cwd=tmp_path)
    assert half.returncode == 0, half.stderr[-3000:]
    rest = _run_cli("train", *flags, "--batch-size", "8", "--out", "run", "--resume", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr[-3000:]
    loss = lambda d: {r["step"]: r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r}  # noqa: E731
    for step in range(5, 9):
        assert abs(loss("run")[step] - loss("ref")[step]) < 1e-5, (step, loss("run"), loss("ref"))


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    cfg = dict(**SMALL, steps=2, eval_interval=2, log_interval=1, checkpoint_interval=2, out=str(tmp_path / "r"))
    train(TrainConfig(**cfg), progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(TrainConfig(**cfg), progress=False)
    with pytest.raises(ConfigError, match="nothing to do"):
        train(TrainConfig(**cfg, resume=True), progress=False)
    train(TrainConfig(**cfg, overwrite=True), progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "r/metrics.jsonl")] == [0, 1, 2]


def test_config_file_and_flags(tmp_path):
    (tmp_path / "c.toml").write_text('steps = 7\nbatch_size = 3\n[model]\nn_layer = 1\n')
    import argparse

    from parallax.cli import main  # noqa: F401  (the parser lives there)
    from parallax.train.arguments import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(tmp_path / "c.toml"), "--steps", "9", "--model", "n_embd=64"]))
    assert (cfg.steps, cfg.batch_size, cfg.model) == (9, 3, {"n_layer": 1, "n_embd": 64})
    (tmp_path / "c.json").write_text(json.dumps({"lr": 0.01}))
    assert config_from_args(parser.parse_args(["--config", str(tmp_path / "c.json")])).lr == 0.01


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "missing_dir"], "missing_dir"),
        (["--data", "empty.txt"], "empty.txt"),
        (["--preset", "gpt5"], "unknown preset 'gpt5'"),
        (["--steps", "0"], "steps must be a positive integer"),
        (["--steps", "-3"], "steps must be a positive integer"),
        (["--config", "nope.toml"], "cannot read config nope.toml"),
        (["--config", "bad.toml"], "cannot parse config bad.toml"),
        (["--config", "unknown.toml"], "unknown field(s) stepz"),
        (["--resume"], "no checkpoint"),
    ],
)
def test_bad_input_fails_with_one_clear_line_and_writes_nothing(tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.toml").write_text("steps = = 3\n")
    (tmp_path / "unknown.toml").write_text("stepz = 3\n")
    proc = _run_cli("train", *args, "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("parallax train: error:") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists(), "bad input must not create the output directory"


def test_plan_flag_trains_with_the_planned_configuration(tmp_path):
    # 6MB per rank: the 2-layer model at 8 x 64 tokens fits only with a leaner configuration than
    # the fp32 stage-0 default; the run logs the table and the pick, then trains with it.
    done = _run_cli("train", "--model", "n_layer=2", "--model", "n_head=2", "--model", "n_embd=64", "--block-size", "64",
                    "--batch-size", "8", "--steps", "3", "--eval-batches", "1", "--sample-tokens", "0", "--device", "cpu",
                    "--plan", "6MB", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = [line for line in done.stderr.splitlines() if line.startswith("plan: ")]
    assert len(chosen) == 1 and "peak/rank" in done.stderr, done.stderr[-3000:]
    assert not chosen[0].startswith("plan: stage 0 fp32 ("), chosen  # the default does not fit
    assert (tmp_path / "run" / "checkpoints").exists()


def test_help_describes_every_flag_with_its_default_and_lists_the_presets():
    import argparse
    import dataclasses

    from parallax.models import PRESETS
    from parallax.train.arguments import add_config_arguments

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        action = actions[f.name]
        assert action.help and len(action.help) > 15, f"--{f.name} has no description"
        if f.default not in (None, dataclasses.MISSING) and not isinstance(f.default, bool):
            assert f"default: {f.default}" in action.help, f"--{f.name} does not show its default"
    assert all(name in actions["preset"].help for name in PRESETS)
    assert actions["precision"].choices == ("fp32", "bf16", "fp16")
