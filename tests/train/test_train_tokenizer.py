"""`parallax train --tokenizer DIR`: the model's vocabulary follows the tokenizer, the checkpoint
records it, `parallax generate` decodes with it, and mismatches fail with one clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from parallax import checkpoint
from parallax.cli import main
from parallax.data import ByteTokenizer, load_tokenizer
from parallax.data.train_tokenizer import train_tokenizer
from parallax.inference import LLM, SamplingParams
from parallax.train import ConfigError, TrainConfig, train
from parallax.train.checkpoints import TOKENIZER_KEY, load_model, saved_tokenizer_reference
from parallax.train.metrics import read_metrics
from tests.data.tokenizer_dirs import corpus

SMALL = dict(model={"n_layer": 2, "n_head": 2, "n_embd": 64}, block_size=64, batch_size=8, eval_batches=2)


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PARALLAX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "parallax-cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A 400-id BPE tokenizer and a 30-step run on the built-in corpus with it."""
    root = tmp_path_factory.mktemp("subword")
    mp = pytest.MonkeyPatch()
    mp.setenv("PARALLAX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "parallax-cache"))
    try:
        tok_dir = root / "tok"
        train_tokenizer(corpus(), 400, tok_dir)
        result = train(TrainConfig(**SMALL, tokenizer=str(tok_dir), steps=30, lr=3e-3, eval_interval=30,
                                   checkpoint_interval=30, sample_tokens=8, out=str(root / "out")), progress=False)
    finally:
        mp.undo()
    return {"root": root, "tok": tok_dir, "out": root / "out", "result": result}


def test_training_on_a_subword_vocabulary(run):
    result, tok = run["result"], load_tokenizer(run["tok"])
    model = load_model(run["out"] / "checkpoints/step_000030")
    assert model.config.vocab_size == tok.vocab_size == 400  # taken from the tokenizer (the preset says 257)
    assert result.initial_val_loss > 5.0  # ~ln 400 untrained
    assert result.val_loss < result.initial_val_loss - 0.5, (result.initial_val_loss, result.val_loss)
    assert result.sample.startswith("The ")
    manifest = checkpoint.read_manifest(run["out"] / "checkpoints/step_000030")
    assert TOKENIZER_KEY in manifest["extra"]["metadata"]
    reference = saved_tokenizer_reference(manifest)
    assert reference == {"source": str(run["tok"].resolve()), "describe": tok.describe()}
    assert [r["step"] for r in read_metrics(run["out"] / "metrics.jsonl") if "val_loss" in r] == [0, 30]


def test_generate_decodes_with_the_runs_tokenizer(run, capsys):
    checkpoint_dir = run["out"] / "checkpoints/step_000030"
    assert main(["generate", "--checkpoint", str(checkpoint_dir), "--prompt", "The ", "--max-tokens", "12",
                 "--temperature", "0", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    llm = LLM(load_model(checkpoint_dir), tokenizer=load_tokenizer(run["tok"]))
    expected = llm.generate("The ", SamplingParams(max_tokens=12, temperature=0))[0]
    assert len(expected.outputs[0].token_ids) == 12
    assert out == "The " + expected.text + "\n"
    assert "12 tokens in" in err


def test_generate_refuses_a_changed_tokenizer_and_accepts_an_explicit_one(run, tmp_path, capsys):
    moved = tmp_path / "moved"
    train_tokenizer(corpus(), 400, moved)  # the same tokenizer at another place
    changed = tmp_path / "changed"
    train_tokenizer(corpus(), 400, changed)
    checkpoint_dir = run["out"] / "checkpoints/step_000030"
    manifest_path = checkpoint_dir / checkpoint.sharded.MANIFEST
    original = manifest_path.read_text()
    try:  # the run's tokenizer reference now points at a directory whose tokenizer.json differs
        manifest_path.write_text(original.replace(str(run["tok"].resolve()), str(changed.resolve())))
        train_tokenizer(corpus()[:5], 300, changed, overwrite=True)
        assert main(["generate", "--checkpoint", str(checkpoint_dir), "--prompt", "The ", "--max-tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert f"checkpoint {checkpoint_dir} was trained with the tokenizer {changed.resolve()}, whose files have " \
               "changed since" in err and "--tokenizer DIR" in err
        assert main(["generate", "--checkpoint", str(checkpoint_dir), "--tokenizer", str(moved), "--prompt", "The ",
                     "--max-tokens", "2", "--seed", "0"]) == 0
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(checkpoint_dir), "--tokenizer", str(tmp_path / "nope"),
                     "--prompt", "x"]) == 2
        assert f"{tmp_path / 'nope'}: no such tokenizer directory" in capsys.readouterr().err
    finally:
        manifest_path.write_text(original)


def test_resume_with_another_tokenizer_is_refused(run):
    cfg = TrainConfig(**SMALL, steps=31, eval_interval=31, checkpoint_interval=31, sample_tokens=0, resume=True,
                      out=str(run["out"]))
    with pytest.raises(ConfigError, match="was trained with another tokenizer"):
        train(cfg, progress=False)


def test_vocab_size_smaller_than_the_tokenizer_is_an_error_naming_both(run, tmp_path):
    flags = ["--model", "vocab_size=300", "--tokenizer", str(run["tok"]), "--steps", "1", "--out", "o"]
    proc = subprocess.run([sys.executable, "-m", "parallax", "train", *flags], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("parallax train: error: model vocab_size 300") and "(400 ids)" in last, proc.stderr
    assert str(run["tok"]) in last and not (tmp_path / "o").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no such tokenizer directory"),
    (lambda d: d.mkdir(), "no tokenizer.json in this directory"),
])
def test_bad_tokenizer_flag_fails_with_one_line(tmp_path, make, message):
    make(tmp_path / "tok")
    proc = subprocess.run([sys.executable, "-m", "parallax", "train", "--tokenizer", "tok", "--out", "o"],
                          capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("parallax train: error:") and "tok" in last and message in last, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_model_vocab_size_follows_the_tokenizer_unless_set():
    assert TrainConfig(preset="gpt2").model_config(257).vocab_size == 257
    assert TrainConfig(preset="gpt2").model_config().vocab_size == 50257  # no tokenizer given: the preset's
    assert TrainConfig(preset="gpt2", model={"vocab_size": 50304}).model_config(257).vocab_size == 50304
    with pytest.raises(ConfigError, match=r"model vocab_size 256 .* tokenizer byte \(257 ids\)"):
        TrainConfig(model={"vocab_size": 256}).model_config(ByteTokenizer.vocab_size)
    with pytest.raises(ConfigError, match="tokenizer must be 'byte' or a tokenizer directory"):
        TrainConfig(tokenizer="")


def test_checkpoints_without_a_tokenizer_record_were_byte_level():
    assert saved_tokenizer_reference({"extra": {"metadata": {}}})["describe"] == ByteTokenizer().describe()
