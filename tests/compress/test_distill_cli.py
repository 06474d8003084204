"""`parallax distill` end to end on tiny teachers and students: metrics, a student checkpoint that
`parallax generate` serves, the vocabulary check, and teacher offload giving the same losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parallax.cli import main
from parallax.compress.distill_config import load_teacher, offload_blocks
from parallax.train.model_source import load_trained

SHORT = ["--steps", "2", "--batch-size", "2", "--block-size", "32", "--eval-interval", "2", "--eval-batches", "1",
         "--checkpoint-interval", "2", "--sample-tokens", "0", "--log-interval", "1", "--warmup-steps", "1"]
GPT_SMALL = ["--model", "n_embd=32", "--model", "n_head=2"]
LLAMA_SMALL = ["--model", "n_embd=32", "--model", "n_head=2", "--model", "n_kv_head=1", "--model",
               "intermediate_size=64"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PARALLAX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "parallax-cache"))


def _teacher(path: Path, preset: str, **fields) -> Path:
    """A random teacher of two blocks saved as a parallax checkpoint with the byte tokenizer."""
    from parallax.data import load_tokenizer
    from parallax.data.tokenizer import tokenizer_reference
    from parallax.models import from_preset
    from parallax.train.checkpoints import save_model

    torch.manual_seed(1)
    teacher = from_preset(preset, n_layer=2, block_size=32, **fields)
    save_model(path, teacher, step=1, model_config=teacher.config, tokenizer=tokenizer_reference(load_tokenizer("byte")))
    return path


@pytest.fixture(scope="module")
def gpt_teacher(tmp_path_factory) -> Path:
    return _teacher(tmp_path_factory.mktemp("kd") / "teacher", "tiny", n_embd=48, n_head=2)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_distill_trains_a_half_depth_student_that_generate_serves(gpt_teacher, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(gpt_teacher), "--student", "tiny", *GPT_SMALL, "--model", "n_layer=1",
                 "--alpha", "0.3", "--temperature", "2", "--divergence", "jsd", "--out", str(out), *SHORT]) == 0
    last = _records(out)[-1]
    assert last["step"] == 2 and {"loss", "ce", "kd", "val_loss"} <= set(last)
    # alpha x CE + (1 - alpha) x T^2 x divergence, as --alpha documents
    assert last["loss"] == pytest.approx(0.3 * last["ce"] + 0.7 * last["kd"], rel=1e-5)
    model, _, _ = load_trained(checkpoint=str(out))
    assert model.config.n_layer == 1
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "The ", "--max-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The ")


def test_teacher_with_another_vocabulary_is_named(gpt_teacher, tmp_path, capsys):
    code = main(["distill", "--teacher", str(gpt_teacher), "--student", "tiny", *GPT_SMALL, "--model", "n_layer=1",
                 "--model", "vocab_size=300", "--out", str(tmp_path / "s"), *SHORT])
    err = capsys.readouterr().err
    assert code == 2
    assert f"teacher {gpt_teacher} has a vocabulary of 257 tokens but the student has 300" in err


def test_teacher_offload_gives_the_same_outputs_and_losses(tmp_path):
    teacher = _teacher(tmp_path / "teacher", "llama-tiny", n_embd=32, n_head=2, n_kv_head=1, intermediate_size=64)
    resident = load_teacher(str(teacher), None, "cpu", torch.float32)
    offloaded = offload_blocks(load_teacher(str(teacher), None, "cpu", torch.float32), torch.device("cpu"))
    idx = torch.randint(0, 257, (2, 9))
    torch.testing.assert_close(offloaded.hidden_states(idx), resident.hidden_states(idx), rtol=0, atol=0)
    runs = []
    for offload in ([], ["--teacher-offload"]):
        out = tmp_path / f"student{len(runs)}"
        assert main(["distill", "--teacher", str(teacher), "--student", "llama-tiny", *LLAMA_SMALL, "--model",
                     "n_layer=1", "--out", str(out), *SHORT, *offload]) == 0
        runs.append([(r["loss"], r["kd"]) for r in _records(out) if "loss" in r])
    assert runs[0] == runs[1]


def test_zero_stages_2_and_3_on_two_ranks_equal_one_process(tmp_path):
    from tests.compress import distill_workers as dw
    from tests.distributed.launch import run_ranks

    teacher = _teacher(tmp_path / "teacher", "tiny", n_embd=48, n_head=2)
    for diffs in run_ranks(dw.parity, 2, str(teacher), str(tmp_path / "out"), [2, 3], timeout_s=60):
        for stage, diff in diffs.items():
            assert diff <= 1e-6, f"stage {stage}: {diff}"
