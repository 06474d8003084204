"""Language filter: English kept and other Latin-script languages removed by the trigram model, scripts
told apart by share of letters, each threshold at its boundary."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest

from parallax.data import builtin_documents
from parallax.data.prep.document import Removed
from parallax.data.prep.language import LanguageFilter, english_bits_per_char

# Hand-written here, not from the model's training text (pydoc_data).
ENGLISH = [
    "My grandmother grew up on a small farm near the river, where she spent her summers picking berries and "
    "helping her father with the horses. She often told us stories about the long winters.",
    "The city council voted on Tuesday to approve a new budget that increases funding for public parks and "
    "libraries, while cutting spending on road repairs. Several residents spoke against the plan.",
    "Preheat the oven, then mix the flour, sugar and butter in a large bowl until the dough feels soft. "
    "Bake the cookies for twelve minutes and let them cool before serving.",
]
OTHER_LATIN = {
    "fr": "Ma grand-mère a grandi dans une petite ferme près de la rivière, où elle passait ses étés à cueillir "
          "des baies et à aider son père avec les chevaux. Elle nous racontait souvent des histoires.",
    "de": "Meine Großmutter ist auf einem kleinen Bauernhof in der Nähe des Flusses aufgewachsen, wo sie ihre "
          "Sommer damit verbrachte, Beeren zu pflücken und ihrem Vater mit den Pferden zu helfen.",
    "es": "Mi abuela creció en una pequeña granja cerca del río, donde pasaba los veranos recogiendo bayas y "
          "ayudando a su padre con los caballos. A menudo nos contaba historias sobre los inviernos.",
    "it": "Mia nonna è cresciuta in una piccola fattoria vicino al fiume, dove trascorreva le estati a "
          "raccogliere bacche e ad aiutare suo padre con i cavalli. Ci raccontava spesso storie.",
    "nl": "Mijn grootmoeder groeide op op een kleine boerderij bij de rivier, waar ze haar zomers doorbracht "
          "met het plukken van bessen en het helpen van haar vader met de paarden.",
    "pt": "Minha avó cresceu em uma pequena fazenda perto do rio, onde passava os verões colhendo frutas e "
          "ajudando o pai com os cavalos. Ela sempre nos contava histórias sobre os invernos.",
}
RUSSIAN = "Моя бабушка выросла на маленькой ферме у реки, где проводила лето, собирая ягоды."


@pytest.mark.parametrize("text", ENGLISH)
def test_english_kept(text):
    assert LanguageFilter().apply(text, Counter()) == text
    assert english_bits_per_char(text) < 3.6


@pytest.mark.parametrize("lang", sorted(OTHER_LATIN))
def test_other_latin_languages_removed_with_score(lang):
    result = LanguageFilter().apply(OTHER_LATIN[lang], Counter())
    assert isinstance(result, Removed)
    assert result.reason.startswith("language: not en (en model ") and "bits/char > 4.0" in result.reason
    assert english_bits_per_char(OTHER_LATIN[lang]) > 4.3  # a margin over the 4.0 cut


def test_builtin_corpus_kept():
    stage = LanguageFilter()
    assert all(stage.apply(d, Counter()) == d for d in builtin_documents())


_STDLIB = ("argparse collections json logging os pathlib re subprocess threading unittest email csv decimal heapq "
           "itertools functools typing asyncio shutil tempfile zipfile tarfile textwrap difflib pickle inspect ast "
           "dataclasses enum statistics random string calendar datetime socket ssl queue contextlib abc copy pprint "
           "doctest pdb tokenize codecs locale gettext base64 hashlib hmac secrets uuid ipaddress mailbox mimetypes "
           "smtplib imaplib ftplib cmd shlex configparser fileinput glob fnmatch bisect weakref types numbers "
           "operator gzip optparse getopt platform signal codeop dis pickletools runpy pkgutil").split()


def test_held_out_english_kept():
    """English the model was not trained on: the docstrings of 47 stdlib modules (>= 200 chars). The one
    removed is ftplib's, mostly a pasted directory listing ("drwxr-xr-x 8 root wheel 1024 ...")."""
    import importlib

    docs = {}
    for name in _STDLIB:
        doc = importlib.import_module(name).__doc__ or ""
        if len(doc) >= 200:
            docs[name] = doc
    stage = LanguageFilter()
    removed = sorted(name for name, doc in docs.items() if stage.apply(doc, Counter()) != doc)
    assert len(docs) >= 45 and removed == ["ftplib"], removed


def test_bits_threshold_boundary():
    text = ENGLISH[0]
    bits = english_bits_per_char(text)
    assert LanguageFilter(max_bits_per_char=bits).apply(text, Counter()) == text
    assert isinstance(LanguageFilter(max_bits_per_char=bits - 1e-6).apply(text, Counter()), Removed)


@pytest.mark.parametrize("last,kept", [("abcde", True), ("abcd", False)])  # Latin 65/100 kept, 64/99 removed
def test_script_share_boundary(last, kept):
    text = " ".join(["abcde"] * 12 + [last] + ["абвгд"] * 7)
    result = LanguageFilter(language="fr").apply(text, Counter())  # fr: script rule only
    if kept:
        assert result == text
    else:
        assert result == Removed("language: Cyrillic script (0.354 of letters), Latin 0.646 < 0.65")


@pytest.mark.parametrize(
    "language,text,kept",
    [
        ("ru", RUSSIAN, True), ("ru", ENGLISH[0], False), ("en", RUSSIAN, False),
        ("zh", "这是一个中文文档，用于测试语言过滤器。", True), ("ja", "これは日本語のテスト文書です。", True),
        ("ko", "이것은 한국어 테스트 문서입니다.", True), ("en", "これは日本語のテスト文書です。", False),
        ("el", "Αυτό είναι ένα ελληνικό κείμενο.", True),
    ],
)
def test_scripts(language, text, kept):
    result = LanguageFilter(language=language).apply(text, Counter())
    assert (result == text) == kept, result


def test_removed_reason_names_detected_script():
    assert LanguageFilter().apply(RUSSIAN, Counter()).reason.startswith("language: Cyrillic script (1.000 of letters)")
    assert LanguageFilter().apply("これは日本語のテスト文書です。", Counter()).reason.startswith("language: Japanese script")
    assert LanguageFilter().apply("12345 !!!", Counter()) == Removed("language: no letters")


def test_only_the_sample_is_scored():
    text = ENGLISH[0] + " " + OTHER_LATIN["de"] * 5
    assert LanguageFilter(sample_chars=len(ENGLISH[0])).apply(text, Counter()) == text
    assert isinstance(LanguageFilter().apply(text, Counter()), Removed)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"language": "xx"}, "language.language"), ({"min_script_share": 2}, "language.min_script_share"),
     ({"max_bits_per_char": 0}, "language.max_bits_per_char"), ({"sample_chars": 0}, "language.sample_chars")],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LanguageFilter(**kwargs)


def test_picklable():
    stage = pickle.loads(pickle.dumps(LanguageFilter(language="en")))
    assert isinstance(stage.apply(OTHER_LATIN["fr"], Counter()), Removed)


@pytest.mark.parametrize("text", ["", " \n ", "lone \ud800 surrogate", "a" * 100_000, "😀 " * 50, "\x00\x01"])
def test_odd_inputs_give_a_verdict(text):
    assert isinstance(LanguageFilter().apply(text, Counter()), (str, Removed))
