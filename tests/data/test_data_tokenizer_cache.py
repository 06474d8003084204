"""Token caches keyed by tokenizer: one entry per tokenizer, a changed tokenizer.json misses, and
vocabularies past 65,536 ids are stored as uint32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from parallax.data import HFTokenizer, load_dataset, load_tokenizer
from parallax.data import cache as cache_mod
from tests.data.tokenizer_dirs import base_tokenizer_json, write_style, write_tokenizer_dir

CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}


def entries(cache_root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((cache_root / "data").glob("*.json"))]


def expected_tokens(tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for i, doc in enumerate(docs):
        out += ([tok.eot_id] if i else []) + tok.encode(doc)
    return out


@pytest.fixture
def corpus_file(data_dir: Path) -> Path:
    f = data_dir / "docs.jsonl"
    docs = ["The quick brown fox.", "héllo wörld 🚀 <|endoftext|> inside", "def f(x):\n    return x\n"]
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return f


def test_two_tokenizers_two_entries_same_corpus(corpus_file: Path, tmp_path: Path, cache_root: Path):
    bpe = write_tokenizer_dir(tmp_path / "bpe", config=CONFIG)
    byte_ds = load_dataset(corpus_file)
    bpe_ds = load_dataset(corpus_file, tokenizer=bpe)
    assert byte_ds.cache_path != bpe_ds.cache_path
    metas = entries(cache_root)
    assert sorted(m["tokenizer"]["name"] for m in metas) == ["byte", "tokenizers"]
    docs = [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()]
    tok = load_tokenizer(bpe)
    assert bpe_ds.tokens.tolist() == expected_tokens(tok, docs)
    assert bpe_ds.tokenizer.describe() == tok.describe() and bpe_ds.vocab_size == 400
    # A special token's text inside a document is encoded as that token (as transformers does).
    assert bpe_ds.tokens.tolist().count(tok.eot_id) == len(docs) - 1 + 1
    assert load_dataset(corpus_file, tokenizer=tok).cache_path == bpe_ds.cache_path  # a hit, by object too
    assert len(entries(cache_root)) == 2


def test_changed_tokenizer_json_invalidates(corpus_file: Path, tmp_path: Path, cache_root: Path,
                                            monkeypatch: pytest.MonkeyPatch):
    path = write_tokenizer_dir(tmp_path / "tok", config=CONFIG)
    first = load_dataset(corpus_file, tokenizer=path)
    calls = [0]
    original = HFTokenizer.encode_arrays

    def counting(self, texts):
        calls[0] += 1
        return original(self, texts)

    monkeypatch.setattr(HFTokenizer, "encode_arrays", counting)
    load_dataset(corpus_file, tokenizer=path)
    assert calls[0] == 0  # unchanged: from the cache
    write_tokenizer_dir(path, config=CONFIG, tokenizer_json=base_tokenizer_json(300))  # retrained in place
    second = load_dataset(corpus_file, tokenizer=path)
    assert calls[0] == 1 and second.cache_path != first.cache_path
    assert second.vocab_size == 300 and len(entries(cache_root)) == 2


def test_changed_added_tokens_in_the_config_invalidate(corpus_file: Path, tmp_path: Path):
    path = write_tokenizer_dir(tmp_path / "tok", config=CONFIG)
    first = load_dataset(corpus_file, tokenizer=path)
    write_tokenizer_dir(path, config={**CONFIG, "bos_token": "<new-bos>"})  # a new token: ids change
    assert load_dataset(corpus_file, tokenizer=path).cache_path != first.cache_path


def test_vocabulary_past_uint16_is_stored_as_uint32(corpus_file: Path, tmp_path: Path, cache_root: Path):
    """A vocabulary of 70,001 ids whose end-of-text token is id 70,000 (Llama 3 and Qwen have > 128k)."""
    spec = json.loads(base_tokenizer_json())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), 70_000)})
    spec["added_tokens"].append({"id": 70_000, "content": "<|big_eot|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    path = write_tokenizer_dir(tmp_path / "big", config={"eos_token": "<|big_eot|>"}, tokenizer_json=json.dumps(spec))
    ds = load_dataset(corpus_file, tokenizer=path)
    assert ds.vocab_size == 70_001 and ds.tokenizer.eot_id == 70_000
    assert ds.tokens.dtype == np.dtype("<u4")
    assert [m["dtype"] for m in entries(cache_root)] == ["<u4"]
    docs = [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()]
    assert ds.tokens.tolist() == expected_tokens(ds.tokenizer, docs)
    x, y = ds.get_batch("train", 2, 8, step=0, seed=0)
    assert x.max() < 70_001
    assert load_dataset(corpus_file, tokenizer=path).tokens.tolist() == ds.tokens.tolist()  # read back from cache


def test_ids_that_do_not_fit_the_dtype_are_refused(tmp_path: Path):
    """Writing id 70,000 as uint16 would wrap it to 4,464 silently."""
    with pytest.raises(ValueError, match="token id 70000 does not fit the cache dtype <u2"):
        cache_mod.write_entry(tmp_path, "k" * 32, [np.array([1, 70_000], dtype=np.int64)], {})
    assert not any(tmp_path.iterdir())
    assert cache_mod.token_dtype(257) == np.dtype("<u2") and cache_mod.token_dtype(65_536) == np.dtype("<u2")
    assert cache_mod.token_dtype(65_537) == np.dtype("<u4")


def test_qwen_style_eos_is_the_document_separator(corpus_file: Path, tmp_path: Path):
    tok = load_tokenizer(write_style(tmp_path / "qwen2", "qwen2"))
    ds = load_dataset(corpus_file, tokenizer=tok)
    assert ds.tokenizer.eot_id == tok.eos_token_id == tok.token_to_id("<|im_end|>")
