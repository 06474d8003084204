"""`parallax tokenizer train`: a byte-level BPE directory that parallax and transformers load
identically, written atomically, and one clear error per bad argument."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parallax.cli import main
from parallax.data import HFTokenizer, load_tokenizer
from parallax.data.train_tokenizer import SPECIAL_TOKENS, train_tokenizer
from tests.data.tokenizer_dirs import corpus, hf_tokenizer

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "héllo 世界 🚀", "  spaces\n\ttabs ",
         "<|im_start|>user\nhi<|im_end|>", "x = [i ** 2 for i in range(10)]"]


@pytest.fixture
def text_file(data_dir: Path) -> Path:
    f = data_dir / "corpus.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus()), encoding="utf-8")
    return f


def test_cli_trains_a_directory_parallax_and_transformers_load_identically(text_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(text_file), "--vocab-size", "400", "--out", str(out)]) == 0
    assert f"{out}: 400 ids trained on {text_file}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary directory left
    ours, ref = load_tokenizer(out), hf_tokenizer(out)
    assert ours.vocab_size == len(ref) == 400
    assert [ours.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert ours.eos_token_id == ours.eot_id == ours.pad_token_id == ref.eos_token_id == ref.pad_token_id == 0
    assert ours.bos_token_id is None and ref.bos_token_id is None
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=True)
        assert ref.encode(text) == ids  # no BOS/EOS added by the post-processor
        assert ours.decode(ids) == ref.decode(ids) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == \
        list(ref.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def test_builtin_corpus_is_the_default(tmp_path: Path):
    tok = train_tokenizer(corpus(), 300, tmp_path / "tok")
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 300
    assert len(tok.encode("The default corpus")) < len("The default corpus")  # merges happened


def test_existing_out_needs_overwrite(text_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "outs" / "tok"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    args = ["tokenizer", "train", "--data", str(text_file), "--vocab-size", "300", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already exists and is not empty; pass --overwrite" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "mine"
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in out.parent.iterdir()] == ["tok"]  # the old directory is gone, no leftovers


def test_a_failed_write_leaves_the_previous_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from parallax.checkpoint import sharded

    out = tmp_path / "outs" / "tok"
    train_tokenizer(corpus(), 300, out)
    before = (out / "tokenizer.json").read_text()
    real = sharded._fsync_path
    calls = [0]

    def fail_on_second_file(path):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError("simulated: disk full")
        real(path)

    monkeypatch.setattr(sharded, "_fsync_path", fail_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        train_tokenizer(corpus(), 400, out, overwrite=True)
    assert (out / "tokenizer.json").read_text() == before
    assert [p.name for p in out.parent.iterdir()] == ["tok"]  # the temporary directory was removed


@pytest.mark.parametrize("flags, message", [
    (["--vocab-size", "100"], "vocab_size must be an integer >= 259"),
    (["--min-frequency", "0"], "min_frequency must be a positive integer"),
    (["--data", "missing.txt"], "missing.txt: no such file or directory"),
])
def test_bad_arguments_fail_with_one_line(tmp_path: Path, flags: list[str], message: str, capsys):
    assert main(["tokenizer", "train", *flags, "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("parallax tokenizer train: error:") and message in err[-1], err
    assert not (tmp_path / "tok").exists()


def test_bad_document_names_file_and_line(data_dir: Path, tmp_path: Path, capsys):
    bad = data_dir / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{broken\n')
    assert main(["tokenizer", "train", "--data", str(bad), "--out", str(tmp_path / "tok")]) == 2
    assert f"{bad}, line 2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenizer", "train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--data", "--vocab-size", "--min-frequency", "--out", "--overwrite", "default: 8192"):
        assert flag in out
