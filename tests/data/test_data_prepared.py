"""Reading a `parallax prep` output directory: its tokens memory-mapped when the tokenizer matches, its
kept documents tokenized otherwise, clear errors for unfinished or tokens-only directories, and
fine-tuning on its documents. The directories are written here by hand to the documented layout, so
these tests pin the contract the pipeline writes to."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from parallax.data import DataError, load_dataset, load_tokenizer
from parallax.data import cache, prepared
from parallax.finetune import load_sft_examples

def _joined(docs: list[str], tok) -> list[int]:
    """Documents' tokens with one end-of-text token between them, as load_dataset joins them."""
    out: list[int] = []
    for i, d in enumerate(docs):
        out += ([tok.eot_id] if i else []) + list(tok.encode(d))
    return out


DOCS = ["First kept document, about sorting lists.", "Second kept document: dictionaries and sets.",
        "Third one, on generators and iterators."]


def _prepare(root: Path, docs: list[str], *, tokens: bool = True, jsonl: bool = True, complete: bool = True,
             tokenizer: str = "byte") -> Path:
    """A prepared directory as `parallax prep` writes it."""
    root.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer)
    if jsonl:
        (root / "documents").mkdir()
        (root / "documents" / "00000.jsonl").write_text(
            "".join(json.dumps({"text": d, "source": "web"}) + "\n" for d in docs), encoding="utf-8")
    if tokens:
        ids = _joined(docs, tok)
        cache.write_entry(root, prepared.TOKENS_KEY, [np.asarray(ids)],
                          {"source": str(root), "content_hash": "c0ffee", "tokenizer": tok.describe()},
                          dtype=cache.token_dtype(tok.vocab_size))
    (root / prepared.MARKER).write_text(json.dumps({"format": "parallax.prep/1", "complete": complete}))
    return root


def test_prepared_tokens_are_memory_mapped_as_written(tmp_path):
    root = _prepare(tmp_path / "prep", DOCS)
    ds = load_dataset(root, val_fraction=0.2)
    assert isinstance(ds.tokens, np.memmap) and Path(ds.cache_path) == root / "tokens.bin"
    tok = load_tokenizer("byte")
    expected = _joined(DOCS, tok)
    np.testing.assert_array_equal(np.asarray(ds.tokens), expected)
    assert ds.content_hash == "c0ffee"
    assert not any((tmp_path / "cache").rglob("*.bin")), "prepared tokens must not be copied into the cache"


def test_another_tokenizer_tokenizes_the_kept_documents(tmp_path, monkeypatch):
    from tests.data.tokenizer_dirs import write_style

    root = _prepare(tmp_path / "prep", DOCS)
    bpe = load_tokenizer(write_style(tmp_path / "bpe", "qwen2"))
    ds = load_dataset(root, tokenizer=bpe, val_fraction=0.2)
    expected = _joined(DOCS, bpe)
    np.testing.assert_array_equal(np.asarray(ds.tokens), expected)
    # Tokens only (no documents/): nothing to re-tokenize; the error says how to re-run prep.
    only_tokens = _prepare(tmp_path / "tokens-only", DOCS, jsonl=False)
    with pytest.raises(DataError, match="--tokenizer|--format tokens,jsonl"):
        load_dataset(only_tokens, tokenizer=bpe)


def test_documents_only_directory_is_tokenized(tmp_path):
    root = _prepare(tmp_path / "prep", DOCS, tokens=False)
    ds = load_dataset(root, val_fraction=0.2)
    tok = load_tokenizer("byte")
    np.testing.assert_array_equal(np.asarray(ds.tokens), _joined(DOCS, tok))


def test_unfinished_prepared_directory_is_refused(tmp_path):
    root = _prepare(tmp_path / "prep", DOCS, complete=False)
    with pytest.raises(DataError, match="has not finished.*--out"):
        load_dataset(root)


def test_insertions_into_prepared_tokens_keep_the_validation_split(tmp_path):
    root = _prepare(tmp_path / "prep", DOCS * 4)
    plain = load_dataset(root, val_fraction=0.25)
    canary = load_dataset(root, val_fraction=0.25, insert=[("the canary 1234", 2)])
    np.testing.assert_array_equal(np.asarray(canary.split_tokens("val")), np.asarray(plain.split_tokens("val")))
    assert canary.num_tokens("train") > plain.num_tokens("train")


def test_finetune_reads_prepared_documents_as_text_rows(tmp_path):
    root = _prepare(tmp_path / "prep", DOCS)
    tok = load_tokenizer("byte")
    examples = load_sft_examples(root, tok, max_length=512)
    assert [tok.decode(list(e.tokens[:-1])) for e in examples] == DOCS
    assert all(all(e.trained) for e in examples)  # text rows train every token
    with pytest.raises(ValueError, match="loss='completion'.*text row"):
        load_sft_examples(root, tok, max_length=512, loss="completion")
    with pytest.raises(DataError, match="--format tokens,jsonl"):
        load_sft_examples(_prepare(tmp_path / "tokens-only", DOCS, jsonl=False), tok, max_length=512)


def test_a_real_prep_run_feeds_load_dataset(tmp_path):
    """`run_prep` output read by load_dataset: the memory-mapped tokens are exactly the kept documents
    (from documents/*.jsonl) joined by end-of-text, and another tokenizer re-tokenizes those documents."""
    from parallax.data.prep import PrepConfig, run_prep, write_noisy_corpus
    from tests.data.tokenizer_dirs import write_style

    write_noisy_corpus(tmp_path / "raw", n_docs=60, files=2, seed=3)
    out = tmp_path / "prepared"
    run_prep(PrepConfig(input=str(tmp_path / "raw"), out=str(out), format=("tokens", "jsonl")))
    kept = [json.loads(line)["text"] for f in sorted((out / "documents").glob("*.jsonl"))
            for line in f.read_text(encoding="utf-8").splitlines()]
    assert 0 < len(kept) < 60
    ds = load_dataset(out, val_fraction=0.1)
    assert isinstance(ds.tokens, np.memmap)
    np.testing.assert_array_equal(np.asarray(ds.tokens), _joined(kept, load_tokenizer("byte")))
    bpe = load_tokenizer(write_style(tmp_path / "bpe", "qwen2"))
    np.testing.assert_array_equal(np.asarray(load_dataset(out, tokenizer=bpe).tokens), _joined(kept, bpe))
