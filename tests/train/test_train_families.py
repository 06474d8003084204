"""The CLI on every model family: `parallax train --preset llama-tiny` (and the other presets) end
to end on the built-in corpus, `parallax generate` serving the run, and `--hf DIR` starting
training and generation from a Hugging Face directory with its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from parallax.cli import main
from parallax.data import load_tokenizer
from parallax.models import Llama, LlamaConfig, to_hf
from parallax.train.checkpoints import load_model, saved_model_config
from parallax import checkpoint
from tests.data.tokenizer_dirs import write_style

TINY = ["--steps", "3", "--batch-size", "2", "--block-size", "32", "--eval-interval", "3", "--eval-batches", "1",
        "--checkpoint-interval", "3", "--sample-tokens", "8", "--log-interval", "1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PARALLAX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "parallax-cache"))


@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny", "qwen2-tiny", "qwen3-tiny"])
def test_every_llama_family_preset_trains_and_generates(preset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", preset, "--out", str(out), *TINY]) == 0
    step = out / "checkpoints/step_000003"
    config = saved_model_config(checkpoint.read_manifest(step))
    assert isinstance(config, LlamaConfig) and config.model_type == preset.split("-")[0]
    assert isinstance(load_model(step), Llama)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "The ", "--max-tokens", "6",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The ")


def test_resume_continues_a_llama_run_bit_exactly(tmp_path):
    """Three steps in one go equal two steps, then --resume for the third (same losses)."""
    def losses(out: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    base = ["train", "--preset", "qwen3-tiny", *TINY]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--steps", "2", "--checkpoint-interval", "2"]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny Llama written by transformers' save_pretrained, with a Llama 3 style tokenizer."""
    path = tmp_path_factory.mktemp("hf") / "llama"
    write_style(path, "llama3")
    vocab = load_tokenizer(path).vocab_size
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
    hf.save_pretrained(path)
    return path


def test_generate_serves_a_hugging_face_directory_with_its_tokenizer(hf_dir, capsys):
    """Greedy text equals transformers' generate on the same directory and tokenizer, with a chat
    template applied and the run stopping at the tokenizer's end-of-turn id."""
    prompt = "What is a list?"
    assert main(["generate", "--hf", str(hf_dir), "--prompt", prompt, "--chat", "--max-tokens", "10",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                           pad_token_id=0)[0, ids.shape[1]:]
    assert tok.decode(expected, skip_special_tokens=True) in printed


def test_train_starts_from_a_hugging_face_directory(hf_dir, tmp_path, capsys):
    """--hf: the directory's weights are the starting point (step-0 validation loss equals the
    loss of the loaded model), its tokenizer tokenizes the corpus, and the trained run exports
    back to a directory transformers loads."""
    out = tmp_path / "run"
    assert main(["train", "--hf", str(hf_dir), "--out", str(out), *TINY, "--lr", "1e-3"]) == 0
    model = load_model(out / "checkpoints/step_000003")
    assert isinstance(model, Llama) and model.config.vocab_size == load_tokenizer(hf_dir).vocab_size
    to_hf(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    x = torch.randint(0, model.config.vocab_size, (1, 9))
    torch.testing.assert_close(reloaded(x).logits, model(x), atol=1e-4, rtol=1e-4)


def test_bad_model_sources_fail_with_one_line(hf_dir, tmp_path, capsys):
    assert main(["train", "--preset", "llama-9000", "--out", str(tmp_path / "a")]) == 2
    assert "unknown preset 'llama-9000'" in capsys.readouterr().err
    assert main(["train", "--hf", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "config.json" in capsys.readouterr().err
    small = ["train", "--preset", "llama-tiny", "--tokenizer", str(hf_dir), "--model", "vocab_size=100",
             "--out", str(tmp_path / "c")]
    assert main(small) == 2
    err = capsys.readouterr().err
    assert "vocab_size 100" in err and str(load_tokenizer(hf_dir).vocab_size) in err
    assert main(["generate", "--hf", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err
