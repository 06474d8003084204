"""Generate the built-in tasks' JSONL data from the built-in corpus (CPython's documentation).

Run once, from the repository root, and commit what it writes::

    python -m parallax.eval.builtin.make_tasks

Everything is a rule over ``parallax.data.builtin_documents()`` plus one ``random.Random(SEED)``
per task, so a rerun on the same corpus writes the same bytes. The corpus is
``pydoc_data.topics``, which changes between Python releases: ``corpus.sha256`` records the one
the committed files were made from. README.md in this folder describes each task.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import re
from pathlib import Path

from parallax.data import builtin_documents

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SEED = 1234
# TokenDataset's default val_fraction: the corpus tail that training holds out as 'val'.
HELD_OUT_FRACTION = 0.1

PASSAGE_MIN_CHARS, PASSAGE_MAX_CHARS, MAX_PASSAGES = 200, 600, 32
CLOZE_ITEMS, CLOZE_MIN_WORD = 50, 5
QA_ITEMS, QA_CONTEXT_CHARS = 50, 500
TITLE_ITEMS, TITLE_PASSAGE_CHARS = 50, 400

_UNDERLINE = re.compile(r"^([*=\-^~])\1{2,}$")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Za-z0-9 ,;:()'\-.?!]+$")  # no markup, quotes, code or grammar symbols
_WORD = re.compile(r"\b[a-z]+\b")  # whole words: no fragments of "NotImplemented"
# Subjects that make "What is X?" meaningless ("There is a ...", "If the value is a ...").
_NOT_SUBJECTS = frozenset({"there", "it", "this", "that", "these", "those", "if", "when", "which",
                           "what", "such", "each", "one", "here", "its", "so", "as", "all", "not",
                           "otherwise", "only", "also", "then", "where", "whether", "below", "above", "following"})
# "X is a/an/the Y." or "X is used to/for Y." with a short subject: the answer is the Y span
# (with its article).
_DEFINITION = re.compile(
    r"^(?P<article>The |An? )?(?P<subject>[A-Za-z\"][A-Za-z\" ]{2,40}?) (?P<verb>is|are) "
    r"(?:(?P<used>used (?:to|for)) )?(?P<answer>(?(used)|(?:a|an|the) )[^.;:()]{5,100}?)\s*[.,;(]")


def corpus_sha256(documents: list[str]) -> str:
    """SHA-256 (hex) of the documents in order; names the Python release's corpus."""
    h = hashlib.sha256()
    for doc in documents:
        h.update(hashlib.sha256(doc.encode("utf-8")).digest())
    return h.hexdigest()


def held_out_documents(documents: list[str], fraction: float = HELD_OUT_FRACTION) -> list[str]:
    """The documents that start in the last ``fraction`` of the corpus text: the part a
    TokenDataset over the built-in corpus keeps as 'val' (measured here in characters)."""
    starts = [end - len(doc) for doc, end in zip(documents, itertools.accumulate(map(len, documents)))]
    total = sum(map(len, documents))
    return [doc for doc, start in zip(documents, starts) if start >= (1 - fraction) * total]


def prose_paragraphs(document: str) -> list[str]:
    """Paragraphs of running text, each on one line: indented blocks (code, grammar, lists)
    and section titles with their underlines are left out."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", document):
        lines = block.strip("\n").split("\n")
        if not block.strip() or lines[0].startswith(" ") or any(_UNDERLINE.match(x.strip()) for x in lines):
            continue
        paragraphs.append(" ".join(line.strip() for line in lines).strip())
    return paragraphs


def sections(document: str) -> list[tuple[str, str]]:
    """(title, first prose paragraph) of each underlined section title in the document."""
    lines = document.split("\n")
    found = []
    for i in range(len(lines) - 1):
        title, underline = lines[i].strip(), lines[i + 1].strip()
        if title and _UNDERLINE.match(underline) and len(underline) == len(title):
            body = "\n".join(lines[i + 2:])
            paragraphs = prose_paragraphs(body)
            if paragraphs:
                found.append((title, paragraphs[0]))
    return found


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def truncate_words(text: str, max_chars: int) -> str:
    """``text`` cut at the last word boundary within ``max_chars``."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rsplit(" ", 1)[0]


def make_perplexity(documents: list[str]) -> list[dict]:
    """Held-out passages: consecutive prose paragraphs joined up to PASSAGE_MAX_CHARS."""
    rows = []
    for doc_index, doc in enumerate(held_out_documents(documents)):
        passage = ""
        for paragraph in prose_paragraphs(doc):
            passage = f"{passage}\n\n{paragraph}" if passage else paragraph
            if len(passage) >= PASSAGE_MIN_CHARS:
                rows.append({"text": truncate_words(passage, PASSAGE_MAX_CHARS)})
                passage = ""
    return rows[:MAX_PASSAGES]


def _vocabulary(documents: list[str]) -> list[str]:
    """Lower-case alphabetic words of the whole corpus, sorted (a fixed order for the rng)."""
    return sorted({w for doc in documents for w in _WORD.findall(doc) if len(w) >= CLOZE_MIN_WORD - 1})


def make_cloze(documents: list[str]) -> list[dict]:
    """Held-out prose sentences with one word blanked; choices are the word and 3 corpus words
    of similar length, each followed by the rest of the sentence."""
    rng = random.Random(SEED)
    vocabulary = _vocabulary(documents)
    candidates = [s for doc in held_out_documents(documents) for p in prose_paragraphs(doc)
                  for s in sentences(p) if 40 <= len(s) <= 200 and _PROSE.match(s)]
    rows = []
    for sentence in rng.sample(candidates, len(candidates)):
        # Blank a plain word after the first few, so the model has some context.
        words = [m for m in re.finditer(r"\b[a-z]+\b", sentence)
                 if m.start() > 15 and len(m.group()) >= CLOZE_MIN_WORD]
        if not words:
            continue
        blank = rng.choice(words)
        answer = blank.group()
        similar = [w for w in vocabulary if abs(len(w) - len(answer)) <= 1 and w != answer]
        options = rng.sample(similar, 3) + [answer]
        rng.shuffle(options)
        rest = sentence[blank.end():]
        rows.append({"context": sentence[:blank.start()].rstrip(),
                     "options": options,
                     "choices": [option + rest for option in options],
                     "label": options.index(answer),
                     "answer": answer})
        if len(rows) == CLOZE_ITEMS:
            break
    return rows


def _context_around(paragraph: str, sentence: str, max_chars: int) -> str:
    """A window of whole sentences of ``paragraph`` that contains ``sentence``."""
    parts = sentences(paragraph)
    i = parts.index(sentence)
    lo, hi = i, i + 1
    while True:
        grown = False
        for new_lo, new_hi in ((lo - 1, hi), (lo, hi + 1)):
            if 0 <= new_lo and new_hi <= len(parts) and len(" ".join(parts[new_lo:new_hi])) <= max_chars:
                lo, hi, grown = new_lo, new_hi, True
        if not grown:
            return " ".join(parts[lo:hi])


def _plain_subject(subject: str) -> bool:
    """A short noun phrase: at most 5 words, no capitalised word after the first (which would
    mean two run-together lines, as in a definition list's "Bytes A bytes object")."""
    words = subject.split()
    return (len(words) <= 5 and not any(w[0].isupper() for w in words[1:])
            and not _NOT_SUBJECTS.intersection(w.lower() for w in words))


def make_qa(documents: list[str]) -> list[dict]:
    """"What is X?" for definition sentences "X is a/an/the Y" of the corpus; the answer is the
    "a/an/the Y" span of the given context."""
    rng = random.Random(SEED)
    items, seen = [], set()
    for doc in documents:
        for paragraph in prose_paragraphs(doc):
            for sentence in sentences(paragraph):
                match = _DEFINITION.match(sentence)
                # Some topics repeat a paragraph of another: keep each sentence once.
                if (match and _plain_subject(match.group("subject")) and sentence not in seen
                        and match.group("answer").count('"') % 2 == 0):
                    seen.add(sentence)
                    items.append((paragraph, sentence, match))
    rows = []
    for paragraph, sentence, match in rng.sample(items, min(QA_ITEMS, len(items))):
        context = _context_around(paragraph, sentence, QA_CONTEXT_CHARS)
        subject = f"{(match.group('article') or '').lower()}{match.group('subject')}"
        if match.group("used"):
            do = " do" if match.group("used").endswith("to") else ""
            question = f"What {match.group('verb')} {subject} {match.group('used')}{do}?"
        else:
            question = f"What {match.group('verb')} {subject}?"
        rows.append({"context": context,
                     "question": question,
                     "answer": match.group("answer"),
                     "answer_start": context.index(sentence) + match.start("answer")})
    return rows


def make_title(documents: list[str]) -> list[dict]:
    """Given a section's first paragraph, generate the section's title."""
    rng = random.Random(SEED)
    items = sorted({(title, truncate_words(body, TITLE_PASSAGE_CHARS))
                    for doc in documents for title, body in sections(doc) if len(body) >= 80})
    return [{"passage": passage, "title": title}
            for title, passage in rng.sample(items, min(TITLE_ITEMS, len(items)))]


GENERATORS = {
    "pydoc_perplexity": make_perplexity,
    "pydoc_cloze": make_cloze,
    "pydoc_qa": make_qa,
    "pydoc_title": make_title,
}


def generate(documents: list[str] | None = None) -> dict[str, str]:
    """Each task's JSONL text, keyed by task name, from ``documents`` (the built-in corpus)."""
    documents = builtin_documents() if documents is None else documents
    return {name: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in make(documents))
            for name, make in GENERATORS.items()}


def main(folder: Path = HERE) -> None:
    documents = builtin_documents()
    for name, text in generate(documents).items():
        (folder / f"{name}.jsonl").write_text(text, encoding="utf-8")
        logger.info("%s: %d items", name, text.count("\n"))
    (folder / "corpus.sha256").write_text(corpus_sha256(documents) + "\n", encoding="utf-8")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
