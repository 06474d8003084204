"""Byte-level tokenizer: every UTF-8 byte is a token, plus one end-of-text token.

No vocabulary file, no training and nothing to download, so any text (any language, any
bytes) round-trips exactly. Sequences are ~4x longer than with BPE, which is fine for the
small reference models it feeds.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """Token ids 0..255 are the UTF-8 bytes of the text; id 256 marks the end of a document.

    ``name`` and ``version`` go into the data cache key: change ``version`` whenever the
    mapping from text to ids changes, so stale caches are not reused.
    """

    name = "byte"
    version = 1
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as ids in [0, 256); never emits ``eot_id``."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Same ids as ``encode`` as a (len,) uint16 array; the fast path used to build caches."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids`` (list, numpy array or tensor); EOT ids are dropped and invalid UTF-8
        (e.g. a sequence cut mid-character) becomes U+FFFD instead of raising."""
        if hasattr(ids, "tolist"):  # numpy arrays and tensors: plain ints, one conversion
            ids = ids.tolist()
        data = bytearray()
        for i in ids:
            if i == self.eot_id:
                continue
            if not 0 <= i < 256:
                raise ValueError(f"ByteTokenizer.decode: id {i} is outside the vocabulary [0, {self.vocab_size})")
            data.append(i)
        return data.decode("utf-8", errors="replace")

    def describe(self) -> dict[str, int | str]:
        """JSON-ready description stored in the cache sidecar."""
        return {"name": self.name, "version": self.version, "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"
