"""Language filter that needs no download: a script-share rule plus, for English, a character trigram model
trained on English text that ships with Python (``pydoc_data.topics``, the 465 kB of reference-manual
prose behind ``help()``).

What it can do, honestly:

- Any language is told apart from languages written in another script: a document is kept when at least
  ``min_script_share`` of its letters are in the language's script (Latin for en/fr/de/..., Cyrillic for
  ru/uk/bg, Han for zh, kana+Han for ja, Hangul for ko, Greek, Arabic, Hebrew, Devanagari, Thai).
- English is also told apart from other Latin-script languages: the trigram model's cross-entropy on the
  document's words is about 3.3 bits/char on English prose and 4.5-5.3 bits/char on French, German,
  Spanish, Italian, Dutch and Portuguese (tests/data/prep/test_prep_language.py); the default cut is 4.0.
  Held-out English (47 stdlib module docstrings, not in the training text) scores at most 3.8, except
  ftplib's, which is mostly a pasted directory listing (4.7).
- It cannot tell which Latin-script language a non-English document is in (no shipped text to train on),
  nor separate languages that share a script other than by that script (ru vs uk). Removed reasons say so:
  "language: not en (en model 4.62 bits/char > 4.0, Latin script)".

Only the first ``sample_chars`` characters are scored: a language decision does not need the whole
document, and the per-trigram loop is Python (about 3 MB/s, so 4,000 chars cost ~1 ms per document).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

from parallax.data.prep.document import Removed

__all__ = ["LanguageFilter", "LANGUAGE_SCRIPTS", "english_bits_per_char"]

_SCRIPTS: dict[str, re.Pattern[str]] = {
    "Latin": re.compile(r"[A-Za-z\u00aa\u00b5\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff]"),
    "Cyrillic": re.compile(r"[\u0400-\u052f]"),
    "Greek": re.compile(r"[\u0370-\u03ff\u1f00-\u1fff]"),
    "Arabic": re.compile(r"[\u0600-\u06ff\u0750-\u077f]"),
    "Hebrew": re.compile(r"[\u0590-\u05ff]"),
    "Devanagari": re.compile(r"[\u0900-\u097f]"),
    "Thai": re.compile(r"[\u0e00-\u0e7f]"),
    "Hangul": re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]"),
    "Han": re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"),
    "Japanese": re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]"),  # kana + kanji
}
# ISO 639-1 code -> script. Latin-script languages other than English are checked by script only.
LANGUAGE_SCRIPTS: dict[str, str] = {
    **dict.fromkeys(("en", "fr", "de", "es", "it", "nl", "pt", "pl", "sv", "da", "no", "fi", "cs", "ro", "hu",
                     "tr", "id", "vi"), "Latin"),
    **dict.fromkeys(("ru", "uk", "bg", "sr", "be", "mk", "kk"), "Cyrillic"),
    "el": "Greek", "ar": "Arabic", "fa": "Arabic", "ur": "Arabic", "he": "Hebrew", "hi": "Devanagari",
    "mr": "Devanagari", "ne": "Devanagari", "th": "Thai", "ko": "Hangul", "zh": "Han", "ja": "Japanese",
}
_LETTER = re.compile(r"[^\W\d_]")
_WORD = re.compile(r"[^\W\d_]+")
_SMOOTH = 0.1  # add-k smoothing of the trigram counts
_ALPHABET = 40  # nominal symbol count for the smoothing denominator (a-z, space, accents seen)


@lru_cache(maxsize=1)
def _english_model() -> tuple[dict[str, float], dict[str, float], float]:
    """log2 P(c3 | c1 c2) over lower-cased words padded with spaces, from pydoc_data's topics:
    (seen trigram -> log2 p, context -> log2 p of an unseen continuation, log2 p for an unseen context).
    Built once per process in ~20 ms."""
    from pydoc_data.topics import topics

    words = Counter(w.lower() for doc in topics.values() for w in _WORD.findall(doc))
    trigrams: Counter[str] = Counter()
    for w, n in words.items():
        padded = f" {w} "
        for i in range(len(padded) - 2):
            trigrams[padded[i : i + 3]] += n
    contexts: Counter[str] = Counter()
    for g, n in trigrams.items():
        contexts[g[:2]] += n
    seen = {g: math.log2((n + _SMOOTH) / (contexts[g[:2]] + _SMOOTH * _ALPHABET)) for g, n in trigrams.items()}
    unseen = {c: math.log2(_SMOOTH / (n + _SMOOTH * _ALPHABET)) for c, n in contexts.items()}
    return seen, unseen, math.log2(1.0 / _ALPHABET)


def english_bits_per_char(text: str) -> float:
    """Cross-entropy (bits per trigram) of ``text``'s lower-cased words under the English model; lower is
    more English-like. ``inf`` when ``text`` has no letters."""
    seen, unseen, floor = _english_model()
    total = 0.0
    count = 0
    for w in _WORD.findall(text.lower()):
        padded = f" {w} "
        for i in range(len(padded) - 2):
            g = padded[i : i + 3]
            lp = seen.get(g)
            if lp is None:
                lp = unseen.get(g[:2], floor)
            total += lp
        count += len(padded) - 2
    return -total / count if count else math.inf


@dataclass(kw_only=True)
class LanguageFilter:
    """Keep documents in ``language`` (ISO 639-1). Removed reasons name the detected script or model score."""

    name: ClassVar[str] = "language"
    language: str = "en"
    min_script_share: float = 0.65  # share of letters in the language's script (datatrove's fastText cut is 0.65)
    max_bits_per_char: float = 4.0  # English only: en 3.3, fr/de/es/it/nl/pt 4.5-5.3 on the test texts
    sample_chars: int = 4000  # score the first N characters

    def __post_init__(self) -> None:
        if self.language not in LANGUAGE_SCRIPTS:
            raise ValueError(f"language.language must be one of {', '.join(sorted(LANGUAGE_SCRIPTS))}, "
                             f"got {self.language!r}")
        if not isinstance(self.min_script_share, (int, float)) or not 0.0 <= self.min_script_share <= 1.0:
            raise ValueError(f"language.min_script_share must be in [0, 1], got {self.min_script_share!r}")
        if not isinstance(self.max_bits_per_char, (int, float)) or self.max_bits_per_char <= 0:
            raise ValueError(f"language.max_bits_per_char must be a positive number, got {self.max_bits_per_char!r}")
        if not isinstance(self.sample_chars, int) or self.sample_chars < 1:
            raise ValueError(f"language.sample_chars must be a positive integer, got {self.sample_chars!r}")
        self._script = LANGUAGE_SCRIPTS[self.language]

    def apply(self, text: str, stats: Counter[str]) -> str | Removed:
        sample = text[: self.sample_chars]
        letters = len(_LETTER.findall(sample))
        if not letters:
            return Removed("language: no letters")
        share = len(_SCRIPTS[self._script].findall(sample)) / letters
        if share < self.min_script_share:
            other, count = max(((s, len(p.findall(sample))) for s, p in _SCRIPTS.items() if s != self._script),
                               key=lambda sc: sc[1])
            return Removed(f"language: {other} script ({count / letters:.3f} of letters), "
                           f"{self._script} {share:.3f} < {self.min_script_share}")
        if self.language == "en":
            bits = english_bits_per_char(sample)
            if bits > self.max_bits_per_char:
                return Removed(f"language: not en (en model {bits:.2f} bits/char > {self.max_bits_per_char}, "
                               f"Latin script)")
        return text
