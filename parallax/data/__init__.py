"""Data layer: byte-level tokenizer, text sources, a memory-mapped token cache, and batches.

    ds = load_dataset()                      # built-in corpus: CPython's documentation
    ds = load_dataset("corpus/")             # .txt / .jsonl files, recursively
    x, y = ds.get_batch("train", 8, 256, step=step, seed=0, rank=rank, world_size=world)  # (8, 256) int64
    for x, y in ds.iter_eval_batches("val", 8, 256, max_batches=20): ...
"""

from parallax.data.cache import resolve_cache_dir
from parallax.data.dataset import SPLITS, Split, TokenDataset
from parallax.data.errors import DataError
from parallax.data.load import load_dataset
from parallax.data.sources import Source, builtin_documents, resolve_source
from parallax.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "SPLITS",
    "Source",
    "Split",
    "TokenDataset",
    "builtin_documents",
    "load_dataset",
    "resolve_cache_dir",
    "resolve_source",
]
