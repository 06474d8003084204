"""Data layer: tokenizers and chat templates, text sources, a memory-mapped token cache, and batches.

    tok = load_tokenizer("dir")              # tokenizer.json (+ configs) of a Hugging Face directory; or "byte"
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ds = load_dataset()                      # built-in corpus: CPython's documentation, byte tokens
    ds = load_dataset("corpus/", tokenizer="dir")   # .txt / .jsonl files, recursively
    x, y = ds.get_batch("train", 8, 256, step=step, seed=0, rank=rank, world_size=world)  # (8, 256) int64
    for x, y in ds.iter_eval_batches("val", 8, 256, max_batches=20): ...
"""

from parallax.data.cache import resolve_cache_dir
from parallax.data.chat import DEFAULT_CHAT_TEMPLATE
from parallax.data.dataset import SPLITS, Split, TokenDataset
from parallax.data.errors import DataError, TokenizerError
from parallax.data.hf_tokenizer import HFTokenizer
from parallax.data.load import load_dataset
from parallax.data.sources import Source, builtin_documents, resolve_source
from parallax.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DEFAULT_CHAT_TEMPLATE",
    "DataError",
    "HFTokenizer",
    "SPLITS",
    "Source",
    "Split",
    "TokenDataset",
    "Tokenizer",
    "TokenizerError",
    "builtin_documents",
    "load_dataset",
    "load_tokenizer",
    "resolve_cache_dir",
    "resolve_source",
]
