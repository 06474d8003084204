"""`parallax generate`: samples from a `parallax train` checkpoint, finds the newest one by default,
and fails with one clear line when there is none or an argument is bad."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from parallax.cli import main
from parallax.data import ByteTokenizer
from parallax.inference import LLM, SamplingParams
from parallax.train import TrainConfig, train
from parallax.train.checkpoints import load_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny `parallax train` run (the demo's layout: RUN/checkpoints/step_N), 4 steps."""
    root = tmp_path_factory.mktemp("generate")
    cache = tmp_path_factory.getbasetemp() / "parallax-cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("PARALLAX_CACHE_DIR", str(cache))
    try:
        train(TrainConfig(model={"n_layer": 1, "n_head": 2, "n_embd": 32}, block_size=32, batch_size=2, steps=4,
                          eval_interval=4, eval_batches=1, sample_tokens=0, checkpoint_interval=2,
                          out=str(root / "out")), progress=False)
    finally:
        mp.undo()
    return root


def test_generate_from_a_checkpoint_matches_the_engine(run_dir, capsys):
    checkpoint = run_dir / "out/checkpoints/step_000004"
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "The ", "--max-tokens", "12",
                 "--temperature", "0", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    llm = LLM(load_model(checkpoint), tokenizer=ByteTokenizer())
    expected = llm.generate("The ", SamplingParams(max_tokens=12, temperature=0))[0]
    assert out == "The " + expected.text + "\n"
    assert "tokens in" in err and "step_000004" in err


def test_without_checkpoint_the_newest_under_out_is_used(run_dir, monkeypatch, capsys):
    monkeypatch.chdir(run_dir)
    assert main(["generate", "--prompt", "a", "--prompt", "b", "--max-tokens", "4", "--seed", "1",
                 "--top-k", "5", "--top-p", "0.9", "--n", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.count("--- prompt") == 4 and "step_000004" in err  # 2 prompts x 2 samples, newest checkpoint
    assert main(["generate", "--checkpoint", "out", "--prompt", "a", "--max-tokens", "3", "--seed", "1"]) == 0


def test_a_context_shorter_than_max_tokens_is_named_as_the_limit(run_dir, capsys):
    """The demo model's context is 32 tokens: a 4-token prompt leaves room for 29, not 300."""
    checkpoint = run_dir / "out/checkpoints/step_000004"
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "The ", "--max-tokens", "300",
                 "--temperature", "0", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "--prompt #1 has 4 tokens, so the model's 32-token context leaves room for 29 new tokens, fewer than " \
           "--max-tokens 300" in err
    assert "29 tokens in" in err and "finish: length (the model's 32-token context)" in err
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "The ", "--max-tokens", "29",
                 "--temperature", "0", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "context leaves room" not in err and "finish: length]" in err


def test_no_checkpoint_or_bad_flags_fail_with_one_line(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--prompt", "x"]) == 2
    assert "no checkpoint under out/checkpoints" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--top-p", "2"]) == 2
    assert "SamplingParams.top_p" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(run_dir / "out"), "--prompt", "ok", "--prompt", ""]) == 2
    assert "--prompt #2 is empty" in capsys.readouterr().err


def test_the_installed_command_runs(run_dir):
    proc = subprocess.run([sys.executable, "-m", "parallax", "generate", "--prompt", "Hi", "--max-tokens", "5",
                           "--seed", "0"], capture_output=True, text=True, cwd=run_dir, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Hi") and "5 tokens in" in proc.stderr
