"""Tokenizers: ``load_tokenizer(source)`` gives the byte-level tokenizer or a Hugging Face
tokenizer directory (``parallax.data.hf_tokenizer``), both with the same interface.

The byte-level tokenizer needs no vocabulary file, no training and nothing to download, so any
text (any language, any bytes) round-trips exactly. Sequences are ~4x longer than with BPE,
which is fine for the small reference models it feeds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from parallax.data.chat import ChatTemplate, ChatTemplateMixin
from parallax.data.errors import TokenizerError

__all__ = ["ByteTokenizer", "Tokenizer", "load_tokenizer", "tokenizer_reference", "tokenizer_from_reference"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer, the training loop and the engine need of a tokenizer.

    ``vocab_size`` is the number of ids the model's embedding must cover (added tokens
    included); ``eot_id`` separates documents in token caches; ``describe()`` is a JSON-ready
    identity that changes whenever the ids of a text change (cache keys, run metadata).
    """

    vocab_size: int
    source: str

    @property
    def eot_id(self) -> int | None: ...

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...


class ByteTokenizer(ChatTemplateMixin):
    """Token ids 0..255 are the UTF-8 bytes of the text; id 256 marks the end of a document.

    ``name`` and ``version`` go into the data cache key: change ``version`` whenever the
    mapping from text to ids changes, so stale caches are not reused. Chats use the default
    ChatML template (``parallax.data.chat.DEFAULT_CHAT_TEMPLATE``), spelled out in bytes.
    """

    name = "byte"
    source = "byte"
    version = 1
    vocab_size = 257
    eot_id = 256
    eos_token_id = 256
    eos_token_ids = (256,)
    bos_token_id = None
    pad_token_id = None
    token_dtype = np.dtype("<u2")
    chat_templates: dict[str, ChatTemplate] = {}
    special_tokens: dict[str, str] = {}  # EOT has no text: templates get no token variables

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes of ``text`` as ids in [0, 256); never emits ``eot_id`` (there is nothing
        for ``add_special_tokens`` to add)."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Same ids as ``encode`` as a (len,) uint16 array; the fast path used to build caches."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """``encode_array`` of each text."""
        return [self.encode_array(text) for text in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids`` (list, numpy array or tensor); EOT ids are dropped (they have no text,
        whatever ``skip_special_tokens`` says) and invalid UTF-8 (e.g. a sequence cut
        mid-character) becomes U+FFFD instead of raising."""
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

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def load_tokenizer(source: str | os.PathLike[str] | Tokenizer | None = "byte") -> Tokenizer:
    """The tokenizer ``source`` names: ``"byte"`` (or None) for ``ByteTokenizer``; a directory
    holding ``tokenizer.json`` (plus optional tokenizer_config.json, special_tokens_map.json,
    generation_config.json, chat_template.jinja), or a tokenizer.json path, for an
    ``HFTokenizer`` (a directory named "byte" is spelled "./byte"); a tokenizer object is
    returned as is.

    Raises ``TokenizerError`` (a ``ValueError``) naming the file or field that cannot be used.
    """
    if source is None or (isinstance(source, str) and source == "byte"):
        return ByteTokenizer()
    if isinstance(source, (str, os.PathLike)):
        if not str(source):
            raise TokenizerError("tokenizer: expected 'byte' or a tokenizer directory, got an empty string")
        from parallax.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(Path(source))
    if isinstance(source, Tokenizer):
        return source
    raise TypeError(f"tokenizer must be 'byte', a tokenizer directory or a tokenizer object, got {source!r}")


def tokenizer_reference(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a run records about its tokenizer: where it was loaded from and its identity."""
    return {"source": tokenizer.source, "describe": tokenizer.describe()}


def tokenizer_from_reference(reference: dict[str, Any], what: str) -> Tokenizer:
    """The tokenizer a ``tokenizer_reference`` names, checked to give the same ids as when it was
    recorded; ``TokenizerError`` naming ``what`` (e.g. the checkpoint) when it is gone or changed."""
    source = reference.get("source")
    try:
        tokenizer = load_tokenizer(source)
    except TokenizerError as exc:
        raise TokenizerError(f"{what} was trained with the tokenizer {source}, which cannot be loaded now ({exc}); "
                             "pass --tokenizer DIR with that tokenizer") from None
    if tokenizer.describe() != reference.get("describe"):
        raise TokenizerError(f"{what} was trained with the tokenizer {source}, whose files have changed since "
                             f"(recorded {reference.get('describe')}, now {tokenizer.describe()}); "
                             "pass --tokenizer DIR with the tokenizer the run used")
    return tokenizer
