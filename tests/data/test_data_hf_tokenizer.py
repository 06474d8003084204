"""Hugging Face tokenizer directories: the same ids, text and special tokens as transformers'
AutoTokenizer, and one clear error per kind of bad directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parallax.data import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer
from tests.data.tokenizer_dirs import SPECIAL_TOKENS, hf_tokenizer, write_style, write_tokenizer_dir

pytest.importorskip("transformers")

TEXTS = [
    "", "Hello world", " leading space", "trailing space ", "two  spaces\tand\ttabs\n\nnewlines\r\n",
    "The quick brown fox jumps over the lazy dog.", "héllo, 世界 🚀 naïve café",
    "def f(x):\n    return x ** 2\n",
    "<|begin_of_text|>special inside<|eot_id|> text<|im_start|>user", "<s>[INST] hi [/INST]</s>", "1234567890" * 5,
]


@pytest.fixture(scope="module")
def styles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("styles")
    return {name: write_style(root / name, name) for name in ("llama3", "qwen2", "mistral")}


@pytest.mark.parametrize("style", ["llama3", "qwen2", "mistral"])
def test_ids_and_text_equal_transformers(styles: dict[str, Path], style: str):
    ours, ref = load_tokenizer(styles[style]), hf_tokenizer(styles[style])
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        with_specials = ours.encode(text, add_special_tokens=True)
        assert with_specials == ref.encode(text), text
        for skip in (False, True):
            assert ours.decode(with_specials, skip_special_tokens=skip) == ref.decode(with_specials,
                                                                                     skip_special_tokens=skip)
    assert ours.vocab_size == len(ref)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == \
           (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id)
    assert ours.special_tokens == ref.special_tokens_map


def test_post_processor_bos_only_with_add_special_tokens(styles: dict[str, Path]):
    """encode() defaults to no special tokens (data caches and chat templates add their own)."""
    tok = load_tokenizer(styles["llama3"])
    bos = tok.bos_token_id
    assert bos == SPECIAL_TOKENS.index("<|begin_of_text|>")
    assert tok.encode("Hello")[0] != bos
    assert tok.encode("Hello", add_special_tokens=True) == [bos] + tok.encode("Hello")


@pytest.fixture(scope="module")
def llama3_pair(styles: dict[str, Path]):
    return load_tokenizer(styles["llama3"]), hf_tokenizer(styles["llama3"])


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=80))
def test_any_text_round_trips_and_matches_transformers(llama3_pair, text: str):
    ours, ref = llama3_pair
    ids = ours.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == ref.decode(ids) == text  # byte-level: every text round-trips
    arr = ours.encode_array(text)
    assert arr.dtype == np.dtype("<u2") and arr.tolist() == ids


def test_batch_encoding_and_decode_inputs(styles: dict[str, Path]):
    tok = load_tokenizer(styles["qwen2"])
    arrays = tok.encode_arrays(TEXTS)
    assert [a.tolist() for a in arrays] == [tok.encode(t) for t in TEXTS]
    ids = tok.encode("Hello world")
    assert tok.decode(np.array(ids, dtype=np.uint16)) == tok.decode(torch.tensor(ids)) == "Hello world"
    with pytest.raises(ValueError, match=f"id {tok.vocab_size} is outside the vocabulary"):
        tok.decode([1, tok.vocab_size])


def test_eos_ids_from_generation_config(styles: dict[str, Path]):
    """Llama 3 stops at <|eot_id|> (the tokenizer's eos) and <|end_of_text|> (generation_config.json)."""
    tok = load_tokenizer(styles["llama3"])
    eot, end = SPECIAL_TOKENS.index("<|eot_id|>"), SPECIAL_TOKENS.index("<|end_of_text|>")
    assert tok.eos_token_id == eot == tok.eot_id
    assert tok.eos_token_ids == (eot, end)


def test_named_special_token_missing_from_tokenizer_json_is_added(tmp_path: Path):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos-not-in-vocab>", "eos_token": "</s>",
              "sep_token": "<|im_end|>"}
    path = write_tokenizer_dir(tmp_path / "t", config=config)
    ours, ref = load_tokenizer(path), hf_tokenizer(path)
    assert ours.vocab_size == len(ref) == 401
    assert ours.bos_token_id == ref.bos_token_id == 400
    text = "x<bos-not-in-vocab>y"
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    assert ours.describe()["added_tokens"] == ["<bos-not-in-vocab>"]


def test_legacy_special_tokens_map_overrides_the_config(tmp_path: Path):
    """Without added_tokens_decoder in the config, special_tokens_map.json's tokens win (transformers)."""
    path = write_tokenizer_dir(tmp_path / "t", config={"tokenizer_class": "PreTrainedTokenizerFast",
                                                       "eos_token": "<|endoftext|>"},
                               files={"special_tokens_map.json": json.dumps(
                                   {"eos_token": {"content": "</s>", "lstrip": False, "normalized": False,
                                                  "rstrip": False, "single_word": False}, "pad_token": "<s>"})})
    ours, ref = load_tokenizer(path), hf_tokenizer(path)
    assert ours.eos_token_id == ref.eos_token_id == SPECIAL_TOKENS.index("</s>")
    assert ours.pad_token_id == ref.pad_token_id == SPECIAL_TOKENS.index("<s>")


def test_tokenizer_json_path_and_describe(styles: dict[str, Path]):
    by_dir, by_file = load_tokenizer(styles["qwen2"]), load_tokenizer(styles["qwen2"] / "tokenizer.json")
    assert by_file.encode("Hello world") == by_dir.encode("Hello world")
    assert by_file.describe() == by_dir.describe()
    assert by_file.eos_token_id == SPECIAL_TOKENS.index("<|im_end|>")
    desc = by_dir.describe()
    assert json.loads(json.dumps(desc)) == desc
    assert desc["vocab_size"] == 400 and desc["eot_id"] == by_dir.eot_id
    assert load_tokenizer(styles["llama3"]).describe() != desc  # another tokenizer.json (post-processor)


def test_byte_is_the_default_and_objects_pass_through():
    assert isinstance(load_tokenizer(), ByteTokenizer) and isinstance(load_tokenizer("byte"), ByteTokenizer)
    tok = ByteTokenizer()
    assert load_tokenizer(tok) is tok
    with pytest.raises(TypeError, match="tokenizer must be"):
        load_tokenizer(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- bad input


def _error(path) -> str:
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(path)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    return str(info.value)


def test_missing_directory(tmp_path: Path):
    assert str(tmp_path / "nope") in _error(tmp_path / "nope")


def test_directory_without_tokenizer_json(tmp_path: Path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    msg = _error(tmp_path)
    assert str(tmp_path) in msg and "no tokenizer.json" in msg


def test_tokenizer_config_not_valid_json(tmp_path: Path):
    path = write_tokenizer_dir(tmp_path / "t")
    (path / "tokenizer_config.json").write_text('{"eos_token": "</s>",\n oops}')
    msg = _error(path)
    assert str(path / "tokenizer_config.json") in msg and "not valid JSON" in msg and "line 2" in msg


def test_tokenizer_json_unreadable(tmp_path: Path):
    (tmp_path / "tokenizer.json").write_text('{"model": "nonsense"}')
    msg = _error(tmp_path)
    assert str(tmp_path / "tokenizer.json") in msg and "tokenizers library" in msg


@pytest.mark.parametrize("value, match", [([1, 2], "must be a string"), ({"lstrip": False}, "'content' string")])
def test_bad_special_token_value(tmp_path: Path, value, match):
    path = write_tokenizer_dir(tmp_path / "t", config={"eos_token": value})
    msg = _error(path)
    assert "tokenizer_config.json: eos_token" in msg and match in msg


def test_no_eos_cannot_separate_documents(tmp_path: Path, data_dir: Path):
    from parallax.data import load_dataset

    path = write_tokenizer_dir(tmp_path / "t")  # tokenizer.json alone: no named special tokens
    (data_dir / "a.txt").write_text("hello")
    with pytest.raises(TokenizerError, match="no end-of-text token.*eos_token"):
        load_dataset(data_dir, tokenizer=path)


_WITHOUT_OPTIONAL = """
import sys
sys.modules["tokenizers"] = None  # what an interpreter without the cli extra sees
sys.modules["jinja2"] = None
import parallax
from parallax.data import ByteTokenizer, load_dataset, load_tokenizer
assert load_tokenizer("byte").encode("hi") == [104, 105]
for call, name in ((lambda: load_tokenizer(sys.argv[1]), "pip install tokenizers"),
                   (lambda: ByteTokenizer().apply_chat_template([{"role": "user", "content": "x"}]), "jinja2")):
    try:
        call()
    except ImportError as exc:
        assert name in str(exc), exc
    else:
        raise AssertionError(name)
print("ok")
"""


def test_core_imports_without_tokenizers_and_jinja2(styles: dict[str, Path]):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _WITHOUT_OPTIONAL, str(styles["qwen2"])], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
