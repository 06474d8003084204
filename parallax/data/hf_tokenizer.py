"""``HFTokenizer``: a Hugging Face tokenizer directory (``tokenizer.json`` + configs) run by the
Rust ``tokenizers`` library, giving the ids ``transformers.AutoTokenizer`` gives.

What is read, as transformers reads it:

- ``tokenizer.json``: the whole pipeline (normalizer, pre-tokenizer, model, added tokens, and
  the post-processor that adds BOS/EOS when ``add_special_tokens=True``). Padding and
  truncation stored in it are switched off, as transformers does unless asked.
- ``tokenizer_config.json`` (optional): the named special tokens (``bos_token``, ``eos_token``,
  ``pad_token``, ``unk_token``, ... and model-specific ``*_token`` names), ``added_tokens_decoder``,
  ``chat_template``, ``split_special_tokens``, ``clean_up_tokenization_spaces``. A named special
  token that is not an added token of tokenizer.json is added (a new id when it is not in the
  vocabulary). ``add_bos_token``/``add_eos_token`` are ignored when tokenizer.json exists (its
  post-processor decides), as in transformers 5.
- ``special_tokens_map.json`` (legacy): its tokens override the config's when the config has no
  ``added_tokens_decoder``.
- ``generation_config.json`` (optional): its ``eos_token_id`` (an int or a list) joins
  ``eos_token_ids``, the ids that end a generation.
- chat templates: see ``parallax.data.chat``.

transformers 5's model-specific classes (e.g. ``LlamaTokenizer``) may rebuild the pipeline from
the vocabulary instead of using tokenizer.json's; this class always runs tokenizer.json as written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from parallax.data.cache import token_dtype
from parallax.data.chat import ChatTemplate, ChatTemplateMixin, load_chat_templates
from parallax.data.errors import TokenizerError

__all__ = ["HFTokenizer", "SPECIAL_TOKEN_NAMES", "tokenizers_library"]

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# transformers' named special tokens (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES), in its order.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


class HFTokenizer(ChatTemplateMixin):
    """A tokenizer directory; build it with ``parallax.data.load_tokenizer(path)``.

    ``encode`` adds no special tokens by default (``add_special_tokens=False``): data caches put
    one ``eot_id`` between documents themselves, and chat templates write their own BOS, so
    neither may get a second one from the post-processor. Pass ``add_special_tokens=True`` for
    what ``transformers``' ``tokenizer.encode(text)`` gives (e.g. Llama's leading BOS).
    """

    name = "tokenizers"
    version = 1  # bump when the ids this class produces for the same files change

    def __init__(self, path: str | Path) -> None:
        """Load the directory ``path`` (or the tokenizer.json file ``path`` and the configs beside
        it); ``TokenizerError`` naming the file or field that cannot be used."""
        self.directory, self.tokenizer_file = _locate(Path(path).expanduser())
        self.source = str(Path(path).expanduser().resolve())
        try:
            raw = self.tokenizer_file.read_bytes()
        except OSError as exc:
            raise TokenizerError(f"{self.tokenizer_file}: cannot read ({exc.strerror or exc})") from None
        self._digest = hashlib.sha256(raw).hexdigest()
        self._backend, self._padding = _backend_from(raw, self.tokenizer_file)
        config_path = self.directory / CONFIG_FILE
        self.config: dict[str, Any] = _read_json(config_path) or {}
        self.special_tokens = self._named_special_tokens(config_path)
        self._added = self._add_missing_tokens()
        if self.config.get("split_special_tokens"):
            self._backend.encode_special_tokens = True
        self.eos_token_ids = self._stop_ids(_read_json(self.directory / GENERATION_CONFIG_FILE) or {})
        self.chat_templates: dict[str, ChatTemplate] = load_chat_templates(self.directory, self.config, config_path)
        vocab = self._backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0  # ids may have holes: the embedding covers all
        self.token_dtype = token_dtype(self.vocab_size)

    # ------------------------------------------------------------------ special tokens

    def _named_special_tokens(self, config_path: Path) -> dict[str, str]:
        """Name -> text of the named special tokens (what templates see as variables)."""
        values = dict(self.config)
        if "added_tokens_decoder" not in self.config:  # legacy layout: special_tokens_map.json wins
            values.update(_read_json(self.directory / SPECIAL_TOKENS_MAP_FILE) or {})
        if values.get("pad_token") is None and self._padding is not None:
            values["pad_token"] = self._padding["pad_token"]  # transformers' default from tokenizer.json
        extra = values.get("extra_special_tokens")
        names = list(SPECIAL_TOKEN_NAMES)
        names += [k for k, v in values.items() if k.endswith("_token") and k not in names and isinstance(v, str)]
        if isinstance(extra, dict):
            values.update(extra)
            names += [k for k in extra if k not in names]
        tokens = {}
        for name in names:
            text = _token_text(values.get(name), f"{config_path}: {name}")
            if text is not None:
                tokens[name] = text
        return tokens

    def _add_missing_tokens(self) -> list[str]:
        """Add the config's added and special tokens that tokenizer.json lacks (transformers does);
        returns their texts, which change ids and so are part of ``describe()``."""
        AddedToken = tokenizers_library().AddedToken
        present = {t.content for t in self._backend.get_added_tokens_decoder().values()}
        wanted: list[AddedToken] = []
        decoder = self.config.get("added_tokens_decoder") or {}
        for _, fields in sorted(decoder.items(), key=lambda item: int(item[0])):
            if isinstance(fields, dict) and fields.get("content") not in present:
                wanted.append(AddedToken(**{k: v for k, v in fields.items() if k in _ADDED_TOKEN_FIELDS}))
        extra = self.config.get("extra_special_tokens") or self.config.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # named: already in special_tokens
            extra = []
        extra_texts = [_token_text(t, f"{self.directory / CONFIG_FILE}: extra_special_tokens") for t in extra]
        for text in [*self.special_tokens.values(), *extra_texts]:
            if text is not None and text not in present and text not in {t.content for t in wanted}:
                wanted.append(AddedToken(text, special=True))
        if wanted:
            self._backend.add_tokens(wanted)
            log.info("tokenizer %s: added %d token(s) named in %s that tokenizer.json lacks: %s", self.directory,
                     len(wanted), CONFIG_FILE, ", ".join(t.content for t in wanted))
        return [t.content for t in wanted]

    def _stop_ids(self, generation: dict[str, Any]) -> tuple[int, ...]:
        """The tokenizer's eos, then generation_config.json's ``eos_token_id`` (an int or a list)."""
        ids = [self.eos_token_id] if self.eos_token_id is not None else []
        extra = generation.get("eos_token_id")
        for i in extra if isinstance(extra, list) else [extra]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in ids:
                ids.append(i)
        return tuple(ids)

    def token_id(self, name: str) -> int | None:
        """Id of the named special token (``"eos_token"``...), None when the tokenizer has none."""
        text = self.special_tokens.get(name)
        return None if text is None else self._backend.token_to_id(text)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self.token_id("unk_token")

    @property
    def eot_id(self) -> int | None:
        """The document separator of token caches: the first of ``eos_token_ids``."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens=True`` runs tokenizer.json's post-processor
        (e.g. a leading BOS), as transformers' default does. See the class docstring."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_array(self, text: str) -> np.ndarray:
        """``encode(text)`` as a (len,) array of ``token_dtype``."""
        return np.asarray(self.encode(text), dtype=self.token_dtype)

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """``encode_array`` of each text, encoded in parallel by the Rust library (cache builds)."""
        encodings = self._backend.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.token_dtype) for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (list, numpy array or tensor), as transformers' ``decode``."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = list(ids)
        # min/max run in C: a generator over the ids was a tenth of the serving engine's Python time
        # (each step decodes every running request's whole output)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"decode: id {bad} is outside the vocabulary [0, {self.vocab_size}) of {self.source}")
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        # transformers skips this clean-up for BPE models, where it would corrupt text.
        if self.config.get("clean_up_tokenization_spaces") and type(self._backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # ------------------------------------------------------------------ identity

    def describe(self) -> dict[str, Any]:
        """JSON-ready identity for cache keys and run metadata: everything that changes the ids of
        ``encode_arrays`` and ``eot_id`` (tokenizer.json's content hash, tokens added from the
        config), not where the files are."""
        return {"name": self.name, "version": self.version, "tokenizer_json_sha256": self._digest,
                "added_tokens": self._added, "split_special_tokens": bool(self.config.get("split_special_tokens")),
                "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size}, eos_token_ids={list(self.eos_token_ids)})"


def _locate(path: Path) -> tuple[Path, Path]:
    """(directory, tokenizer.json) of a directory or of a tokenizer.json path."""
    if path.is_dir():
        directory, tokenizer_file = path.resolve(), path.resolve() / TOKENIZER_FILE
    elif path.is_file():
        directory, tokenizer_file = path.resolve().parent, path.resolve()
    else:
        raise TokenizerError(f"{path}: no such tokenizer directory or file")
    if not tokenizer_file.is_file():
        raise TokenizerError(f"{directory}: no {TOKENIZER_FILE} in this directory (a Hugging Face tokenizer "
                             "directory holds tokenizer.json and tokenizer_config.json; `parallax tokenizer train` "
                             "writes one)")
    return directory, tokenizer_file


def _backend_from(raw: bytes, path: Path) -> tuple[Any, dict[str, Any] | None]:
    """The Rust tokenizer of tokenizer.json's bytes, padding and truncation off, and the padding
    settings the file had (their pad token is transformers' default pad_token)."""
    library = tokenizers_library()
    try:
        backend = library.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # the Rust library raises a plain Exception; bad UTF-8 a UnicodeDecodeError
        raise TokenizerError(f"{path}: not a tokenizer.json the tokenizers library can read ({exc})") from None
    backend.no_truncation()  # transformers encodes untruncated and unpadded unless asked
    padding = backend.padding
    backend.no_padding()
    return backend, padding


def tokenizers_library():
    """The ``tokenizers`` module, or an ImportError saying how to install it (it is optional)."""
    try:
        import tokenizers
    except ImportError:
        raise ImportError("Hugging Face tokenizers need the tokenizers library: pip install tokenizers "
                          "(or pip install 'parallax[cli]')") from None
    return tokenizers


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file; None when it does not exist; TokenizerError naming it otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read ({exc})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value: Any, where: str) -> str | None:
    """A special token's text from its config value: a string, or an AddedToken dict {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where} must be a string or an object with a 'content' string, got {value!r}")


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and English contractions."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text
