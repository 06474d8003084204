"""A deterministic noisy corpus with known defects, for ``parallax prep --demo``, the tests and
``python -m bench prep``.

Documents are built from the built-in corpus (CPython's documentation, ``builtin_documents()``):
its prose sentences are recombined into paragraphs of 2-5 sentences, one paragraph per line, and
documents of ~1-5 KB, so that two clean documents share almost no 5-gram shingles (a pool of
~500 sentences, 8-40 per document) while every clean line ends in terminal punctuation and holds
no braces, "javascript" or policy phrases: clean documents pass the Gopher and C4 rules.

Every row is ``{"text", "id", "planted"}``; ``planted`` says what was planted:

* ``clean``: a recombined document;
* ``exact_dup``: a byte-identical copy of an earlier clean document (``dup_of`` names it);
* ``near_dup``: a copy of an earlier clean document with a few words replaced, so that the Jaccard
  similarity of their word 5-gram shingle sets (lower-cased, split on whitespace; ``shingles``) lies
  in [0.85, 0.95] (``jaccard``, ``dup_of``);
* ``pii``: a clean document with 1-3 lines holding e-mail addresses, phone numbers, IPv4/IPv6
  addresses, credit card numbers (valid Luhn), IBANs (valid mod-97) or API keys (``pii``: the list
  of ``[kind, value]`` planted);
* ``junk:<kind>``: what the Gopher/C4 rules remove: ``lorem`` (lorem ipsum), ``javascript``
  (mostly "enable JavaScript" lines), ``cookie`` (cookie/privacy policy boilerplate), ``symbols``
  (hashtags and symbol soup), ``bullets`` (bullet lists), ``repeated`` (one line many times),
  ``short`` (under 50 words);
* ``foreign``: text in generated Cyrillic, Greek or CJK words (letters drawn from their Unicode blocks);
* ``toxic``: a clean document with ~15% of its words taken from glin-profanity's English word
  list (the toxic stage's; read from the installed package at run time, no such word is written in this repository).

Duplicates always copy an *earlier* document, and ``write_noisy_corpus`` fills its files in order
(file 0 first), so the original of every duplicate comes first in (file, line) order: a
deduplicator that keeps the first copy drops exactly the rows labelled as duplicates.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import string
from collections.abc import Iterator
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

from parallax.data.prep.files import atomic_file

__all__ = ["PLANTED", "JUNK_KINDS", "PII_KINDS", "NEAR_DUP_JACCARD", "noisy_corpus", "iter_noisy_corpus",
           "write_noisy_corpus", "shingles", "jaccard"]

JUNK_KINDS: tuple[str, ...] = ("lorem", "javascript", "cookie", "symbols", "bullets", "repeated", "short")
# One block of 50 labels, shuffled per block: every label appears in any 50 consecutive documents.
_BLOCK: tuple[str, ...] = (
    ("clean",) * 28 + ("exact_dup",) * 4 + ("near_dup",) * 4 + ("pii",) * 4
    + tuple(f"junk:{k}" for k in JUNK_KINDS) + ("foreign",) * 2 + ("toxic",)
)
PLANTED: tuple[str, ...] = tuple(dict.fromkeys(_BLOCK))
NEAR_DUP_JACCARD = (0.85, 0.95)
_NGRAM = 5
_RESERVOIR = 4096  # clean documents remembered as duplicate sources (bounded memory for 200 MB corpora)
_COMPRESSIONS = {None: "", "gzip": ".gz", "zstd": ".zst"}

# Lines a clean document must not contain: the C4 rules would drop them (datatrove's POLICY_SUBSTRINGS).
_BANNED = ("{", "}", "javascript", "lorem ipsum", "terms of use", "privacy policy", "cookie policy",
           "uses cookies", "use of cookies", "use cookies", "...", "…", "#")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“*(])")
# Punctuation per word of a sentence, at most: datatrove's Gopher rule counts punctuation tokens as words and
# wants >= 80% of them alphabetic; code-heavy sentences (quotes, parentheses) would fail it. 0.2 keeps 529
# of the 1,242 prose sentences of Python 3.11's documentation, and every clean document passes.
_MAX_PUNCTUATION = 0.2
_PUNCTUATION = frozenset(string.punctuation + "“”‘’–—")


# --------------------------------------------------------------------------------------------
# the material


@lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    """Distinct prose sentences of the built-in corpus (unwrapped; code blocks, which pydoc indents,
    skipped), each with >= 4 words and ending in terminal punctuation."""
    from parallax.data.sources import builtin_documents

    seen: dict[str, None] = {}
    for doc in builtin_documents():
        for para in re.split(r"\n\s*\n", doc):
            lines = para.split("\n")
            if any(line.startswith(" ") for line in lines):
                continue
            # "*" marks emphasis in pydoc's text: markup, not prose
            text = " ".join(" ".join(line.split()) for line in lines).replace("*", "").strip()
            for sentence in _SENTENCE_END.split(text):
                low = sentence.lower()
                n_words = len(sentence.split())
                if (n_words >= 4 and sentence.endswith((".", "?", "!")) and not any(b in low for b in _BANNED)
                        and sum(ch in _PUNCTUATION for ch in sentence) <= _MAX_PUNCTUATION * n_words):
                    seen.setdefault(sentence)
    return tuple(seen)


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """Lower-case alphabetic words of the sentences, sorted (replacement words for near duplicates)."""
    return tuple(sorted({w for s in _sentences() for w in s.lower().split() if w.isalpha() and len(w) >= 3}))


@lru_cache(maxsize=1)
def _profanity_words() -> tuple[str, ...]:
    """Alphabetic single words of the toxic stage's English list (glin-profanity's, read from the installed
    package), so the planted toxic documents are what the stage looks for."""
    from parallax.data.prep.toxic import load_wordlist

    singles, _ = load_wordlist("en")
    return tuple(sorted(w for w in singles if w.isalpha()))


# --------------------------------------------------------------------------------------------
# shingles (the near-duplicate ground truth)


def shingles(text: str, ngram: int = _NGRAM) -> set[str]:
    """Word ``ngram``-gram shingles: lower-cased words split on whitespace, joined by one space; a text
    shorter than ``ngram`` words is one shingle of all its words."""
    words = text.lower().split()
    if len(words) < ngram:
        return {" ".join(words)}
    return {" ".join(words[i:i + ngram]) for i in range(len(words) - ngram + 1)}


def jaccard(a: str, b: str, ngram: int = _NGRAM) -> float:
    """Exact Jaccard similarity of the ``shingles`` of ``a`` and ``b``."""
    sa, sb = shingles(a, ngram), shingles(b, ngram)
    return len(sa & sb) / len(sa | sb)


# --------------------------------------------------------------------------------------------
# document makers (each takes the generator's Random)


def _clean(rng: random.Random, min_bytes: int = 1000, max_bytes: int = 5000) -> str:
    """Paragraphs of 2-5 distinct sentences, one per line, until the target size (log-uniform in
    [min_bytes, max_bytes]: more short documents than long ones, as on the web)."""
    pool = _sentences()
    target = int(min_bytes * (max_bytes / min_bytes) ** rng.random())
    picked = rng.sample(range(len(pool)), min(len(pool), 200))  # distinct sentences: no repeated lines
    paragraphs: list[str] = []
    size = 0
    while size < target and picked:
        n = rng.randint(2, 5)
        para = " ".join(pool[j] for j in picked[:n])
        del picked[:n]
        paragraphs.append(para)
        size += len(para.encode()) + 2
    return "\n\n".join(paragraphs)


def _near_duplicate(rng: random.Random, source: str) -> tuple[str, float] | None:
    """``source`` with words replaced one at a time (at least 5 words apart, so each replacement
    changes its own 5 shingles) until the shingle Jaccard falls to a target drawn in
    [0.86, 0.94]; None when it cannot land in [0.85, 0.95] (a very short source)."""
    words = source.split(" ")
    vocab = _vocabulary()
    target = rng.uniform(0.86, 0.94)
    positions = list(range(0, len(words), _NGRAM))
    rng.shuffle(positions)
    base = shingles(source)
    for pos in positions:
        word = words[pos]
        core = word.strip(".,;:!?\"'()*“”")
        if not core.isalpha():
            continue
        new = rng.choice(vocab)
        if new == core.lower():
            continue
        words[pos] = word.replace(core, new, 1)
        candidate = " ".join(words)
        cand = shingles(candidate)
        sim = len(base & cand) / len(base | cand)
        if sim <= target:
            lo, hi = NEAR_DUP_JACCARD
            return (candidate, sim) if lo <= sim <= hi else None
    return None


_FIRST = ("alice", "bob", "carol", "dmitri", "erin", "farah", "goran", "hana", "ivan", "jun", "kofi", "lena")
_LAST = ("smith", "novak", "garcia", "kim", "okafor", "silva", "muller", "tanaka", "rossi", "haddad")
_DOMAINS = ("example.com", "mail.example.org", "corp.example.net", "uni-example.edu")


def _luhn_complete(digits: str) -> str:
    """``digits`` plus the Luhn check digit."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:  # these positions are doubled once the check digit is appended
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return digits + str((10 - total % 10) % 10)


def _iban(country: str, bban: str) -> str:
    """An IBAN with valid mod-97 check digits (ISO 13616)."""
    rearranged = bban + country + "00"
    number = int("".join(str(int(ch, 36)) for ch in rearranged))
    return f"{country}{98 - number % 97:02d}{bban}"


def _alnum(rng: random.Random, n: int, alphabet: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
           ) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _pii_value(rng: random.Random, kind: str) -> str:
    if kind == "email":
        return f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}{rng.randint(1, 99)}@{rng.choice(_DOMAINS)}"
    if kind == "phone":
        a, b, c = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
        return rng.choice((f"+1 {a}-{b}-{c:04d}", f"({a}) {b}-{c:04d}", f"+44 20 {b}{c % 10} {c:04d}",
                           f"{a}.{b}.{c:04d}"))
    if kind == "ip":
        if rng.random() < 0.25:
            return "2001:db8:" + ":".join(f"{rng.randint(0, 0xffff):x}" for _ in range(6))
        first = rng.choice([n for n in range(11, 224) if n not in (127, 172, 192)])  # public addresses
        return ".".join(str(x) for x in (first, rng.randint(0, 255), rng.randint(0, 255), rng.randint(1, 254)))
    if kind == "credit_card":
        # Issued ranges only (Visa 4, Mastercard 51-55): a 16-digit number outside them is no card number.
        prefix = rng.choice(["4" + str(rng.randint(0, 9)), "5" + str(rng.randint(1, 5))])
        number = _luhn_complete(prefix + "".join(str(rng.randint(0, 9)) for _ in range(13)))
        sep = rng.choice(("", " ", "-"))
        return sep.join(number[i:i + 4] for i in range(0, 16, 4))
    if kind == "iban":
        if rng.random() < 0.5:
            iban = _iban("DE", "".join(str(rng.randint(0, 9)) for _ in range(18)))
        else:
            iban = _iban("GB", _alnum(rng, 4, "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
                         + "".join(str(rng.randint(0, 9)) for _ in range(14)))
        return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.5 else iban
    if kind == "secret":
        return rng.choice((
            "AKIA" + _alnum(rng, 16, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"),
            "ghp_" + _alnum(rng, 36),
            "sk-" + _alnum(rng, 48),
            "xoxb-" + "-".join(str(rng.randint(10**11, 10**12 - 1)) for _ in range(2)) + "-" + _alnum(rng, 24),
            "AIza" + _alnum(rng, 35, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"),
        ))
    raise ValueError(f"unknown PII kind {kind!r}")


PII_KINDS: tuple[str, ...] = ("email", "phone", "ip", "credit_card", "iban", "secret")
_PII_TEMPLATES = {
    "email": ("Please send questions about this module to {} before the next release.",
              "The maintainer can be reached at {} for security reports."),
    "phone": ("For urgent problems with the build, call {} during office hours.",
              "The support line at {} is open on weekdays."),
    "ip": ("The test server at {} answered every request in the benchmark.",
           "Connections from {} were refused by the firewall last week."),
    "credit_card": ("The order was paid with the card {} and shipped the next day.",
                    "A refund to card number {} was issued yesterday."),
    "iban": ("Transfer the fee to the account {} by the end of the month.",
             "Our bank account is {} at the local branch."),
    "secret": ("The deployment script still contains the key {} in plain text.",
               "Rotate the token {} because it was committed by mistake."),
}


def _pii(rng: random.Random) -> tuple[str, list[list[str]]]:
    paragraphs = _clean(rng).split("\n\n")
    planted = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(PII_KINDS)
        value = _pii_value(rng, kind)
        planted.append([kind, value])
        paragraphs.insert(rng.randint(0, len(paragraphs)), rng.choice(_PII_TEMPLATES[kind]).format(value))
    return "\n\n".join(paragraphs), planted


_LOREM = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
          "dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea "
          "commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum fugiat nulla pariatur "
          "excepteur sint occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est "
          "laborum").split()
_JAVASCRIPT = ("Please enable JavaScript in your browser to view this page.",
               "This site requires JavaScript to work properly.",
               "JavaScript is disabled in your browser settings right now.",
               "You need to turn on JavaScript to use the search box.",
               "Some features will not work until JavaScript is enabled again.",
               "Your browser does not support JavaScript or it is turned off.")
_COOKIE = ("This website uses cookies to improve your experience on our pages.",
           "We use cookies to personalise content and ads for our visitors.",
           "By continuing to browse you agree to our cookie policy and our terms.",
           "Please read our privacy policy before you sign up for the newsletter.",
           "Access to this site is governed by the terms of use posted below.",
           "Learn more about the use of cookies on the settings page.")
_HASHTAGS = ("#love", "#instagood", "#photooftheday", "#tbt", "#summer", "#python", "#coding", "#travel", "#food",
             "#nofilter", "#followme", "#happy")
_SYMBOLS = "@#$%^&*~|<>+=_/\\"


def _sentences_from_pool(rng: random.Random, n: int) -> list[str]:
    pool = _sentences()
    return [pool[i] for i in rng.sample(range(len(pool)), n)]


def _junk(rng: random.Random, kind: str) -> str:
    if kind == "lorem":
        # a page left with its template's placeholder paragraphs: English enough for Gopher, C4 drops it
        words = [rng.choice(_LOREM) for _ in range(rng.randint(40, 200))]
        words[:5] = _LOREM[:5]
        text = " ".join(words)
        paragraphs = _clean(rng, 500, 1500).split("\n\n")
        for i in range(0, len(text), 300):
            paragraphs.insert(rng.randint(0, len(paragraphs)), text[i:i + 300].strip().capitalize() + ".")
        return "\n\n".join(paragraphs)
    if kind in ("javascript", "cookie"):
        # boilerplate lines (C4 drops them) around 2-3 real sentences: too few sentences remain
        lines = list(_JAVASCRIPT if kind == "javascript" else _COOKIE)
        lines += _sentences_from_pool(rng, rng.randint(2, 3))
        rng.shuffle(lines)
        return "\n".join(lines)
    if kind == "symbols":
        lines = []
        for _ in range(rng.randint(8, 20)):
            if rng.random() < 0.5:
                lines.append(" ".join(rng.choice(_HASHTAGS) for _ in range(rng.randint(5, 12))))
            else:
                lines.append(" ".join("".join(rng.choice(_SYMBOLS) for _ in range(rng.randint(2, 6)))
                                      for _ in range(rng.randint(5, 12))))
        return "\n".join(lines)
    if kind == "bullets":
        items = [" ".join(s.split()[:rng.randint(3, 8)]) for s in _sentences_from_pool(rng, rng.randint(12, 30))]
        return "\n".join(f"{rng.choice('•-')} {item}" for item in items)
    if kind == "repeated":
        line = _sentences_from_pool(rng, 1)[0]
        return "\n".join([line] * rng.randint(20, 40))
    if kind == "short":  # under Gopher's 50 words
        picked: list[str] = []
        for sentence in _sentences_from_pool(rng, 20):
            if sum(len(p.split()) for p in picked) + len(sentence.split()) < 50:
                picked.append(sentence)
            if len(picked) == 2:
                break
        return " ".join(picked)
    raise ValueError(f"unknown junk kind {kind!r}; expected one of {', '.join(JUNK_KINDS)}")


_SCRIPTS = {  # letters of each script's Unicode block (final sigma left out: it has no upper case of its own)
    "cyrillic": [chr(c) for c in range(0x0430, 0x0450)],
    "greek": [chr(c) for c in range(0x03B1, 0x03CA) if c != 0x03C2],
    "cjk": [chr(c) for c in range(0x4E00, 0x9FA6)],
}


def _foreign(rng: random.Random) -> str:
    script = rng.choice(sorted(_SCRIPTS))
    letters = _SCRIPTS[script]
    target = rng.randint(1000, 3000)
    paragraphs, size = [], 0
    while size < target:
        sentences = []
        for _ in range(rng.randint(2, 5)):
            if script == "cjk":
                sentences.append("".join(rng.choice(letters) for _ in range(rng.randint(10, 30))) + "。")
            else:
                words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
                         for _ in range(rng.randint(6, 15))]
                sentences.append(" ".join(words).capitalize() + ".")
        para = " ".join(sentences)
        paragraphs.append(para)
        size += len(para.encode())
    return "\n\n".join(paragraphs)


def _toxic(rng: random.Random) -> str:
    bad = _profanity_words()
    paragraphs = []
    for para in _clean(rng, 1000, 2000).split("\n\n"):
        words = para.split(" ")
        for i in rng.sample(range(len(words)), max(1, len(words) * 15 // 100)):
            words[i] = rng.choice(bad)
        paragraphs.append(" ".join(words))
    return "\n\n".join(paragraphs)


# --------------------------------------------------------------------------------------------
# the corpus


def iter_noisy_corpus(*, seed: int = 0) -> Iterator[dict[str, Any]]:
    """The endless corpus behind ``noisy_corpus``: rows in a fixed order for a given ``seed``."""
    rng = random.Random(seed)
    sources: list[tuple[str, str]] = []  # (id, text) of earlier clean documents, a reservoir sample
    n_clean = 0
    i = 0
    block_no = 0
    while True:
        block = list(_BLOCK)
        rng.shuffle(block)
        if block_no == 0:  # a duplicate needs an earlier clean document
            block.insert(0, block.pop(block.index("clean")))
        block_no += 1
        for label in block:
            row: dict[str, Any] = {"id": f"noisy-{i:07d}", "planted": label}
            if label == "clean":
                row["text"] = _clean(rng)
            elif label == "exact_dup":
                source_id, row["text"] = rng.choice(sources)
                row["dup_of"] = source_id
            elif label == "near_dup":
                made = None
                while made is None:
                    source_id, source = rng.choice(sources)
                    made = _near_duplicate(rng, source)
                row["text"], row["jaccard"] = made[0], round(made[1], 4)
                row["dup_of"] = source_id
            elif label == "pii":
                row["text"], row["pii"] = _pii(rng)
            elif label.startswith("junk:"):
                row["text"] = _junk(rng, label[5:])
            elif label == "foreign":
                row["text"] = _foreign(rng)
            else:
                row["text"] = _toxic(rng)
            if label == "clean":
                n_clean += 1
                if len(sources) < _RESERVOIR:
                    sources.append((row["id"], row["text"]))
                else:
                    j = rng.randrange(n_clean)
                    if j < _RESERVOIR:
                        sources[j] = (row["id"], row["text"])
            yield {"text": row.pop("text"), **row}
            i += 1


def noisy_corpus(n_docs: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``n_docs`` rows of the noisy corpus for ``seed``: dicts with ``text``, ``id``
    ("noisy-0000042"), ``planted`` (one of ``PLANTED``) and, for duplicates, ``dup_of`` (and
    ``jaccard`` for near duplicates), for PII documents ``pii`` ([kind, value] pairs).

    Deterministic: the same arguments give the same rows on every machine, and a shorter corpus is a
    prefix of a longer one. About 56% clean, 8% exact and 8% near duplicates, 8% PII, 14% junk (2% per
    kind), 4% foreign script, 2% toxic.
    """
    if not isinstance(n_docs, int) or isinstance(n_docs, bool) or n_docs < 0:
        raise ValueError(f"n_docs must be a non-negative integer, got {n_docs!r}")
    return list(islice(iter_noisy_corpus(seed=seed), n_docs))


def _compressor(raw: io.BufferedWriter, compress: str | None):
    """A binary sink writing into ``raw`` (compressed as asked) whose ``close`` leaves ``raw`` open."""
    if compress == "gzip":
        return gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)  # mtime 0: same bytes every run
    if compress == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False)
    return None


def write_noisy_corpus(directory: str | os.PathLike[str], *, n_docs: int | None = None,
                       size_bytes: int | None = None, files: int = 4, seed: int = 0,
                       compress: str | None = None) -> list[Path]:
    """Write the noisy corpus as ``files`` JSONL shards ``part-00000.jsonl`` ... (``.gz`` with
    ``compress="gzip"``, ``.zst`` with ``"zstd"``) in ``directory`` and return their paths.

    Give exactly one of ``n_docs`` (the first ``n_docs`` rows, split into contiguous, near-equal parts)
    or ``size_bytes`` (uncompressed JSONL bytes: each file is filled with the next rows until it holds
    ``size_bytes / files`` bytes, so the total is at least ``size_bytes`` and exceeds it by under one
    document per file). Files are filled in order, so every duplicate comes after its original in
    (file, line) order. Each file is written to a temporary name and renamed into place: a failure
    leaves no partial shard.
    """
    if (n_docs is None) == (size_bytes is None):
        raise ValueError("give exactly one of n_docs and size_bytes")
    for name, value in (("n_docs", n_docs), ("size_bytes", size_bytes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(files, int) or isinstance(files, bool) or files < 1:
        raise ValueError(f"files must be a positive integer, got {files!r}")
    if compress not in _COMPRESSIONS:
        raise ValueError(f"compress must be one of None, 'gzip', 'zstd', got {compress!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rows = iter_noisy_corpus(seed=seed)
    paths = []
    for k in range(files):
        path = out / f"part-{k:05d}.jsonl{_COMPRESSIONS[compress]}"
        with atomic_file(path, binary=True) as raw:
            sink = _compressor(raw, compress)
            write = (sink if sink is not None else raw).write
            if n_docs is not None:
                for row in islice(rows, n_docs // files + (k < n_docs % files)):
                    write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            else:
                budget, written = size_bytes / files, 0
                while written < budget:
                    line = (json.dumps(next(rows), ensure_ascii=False) + "\n").encode("utf-8")
                    write(line)
                    written += len(line)
            if sink is not None:
                sink.close()
        paths.append(path)
    return paths
