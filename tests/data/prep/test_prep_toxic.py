"""Toxic-text filter: the flagged-word share at its threshold, matching robust to case and punctuation,
phrases, whole-token matching, and the classifier hook. Flagged words are taken from the word list itself
so that none is written here."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import pytest

from parallax.data import builtin_documents
from parallax.data.prep.document import Removed
from parallax.data.prep.stages import build_stage
from parallax.data.prep.toxic import ToxicFilter, load_wordlist

pytest.importorskip("glin_profanity")

SINGLES, PHRASES = load_wordlist("en")
WORD = next(w for w in sorted(SINGLES) if w.isalpha() and len(w) >= 4)
PHRASE = next(p for ps in sorted(PHRASES.values()) for p in ps if len(p) == 3 and all(t.isalpha() for t in p))
CLEAN = ["river", "garden", "window", "bread", "music", "paper", "stone", "cloud", "table", "light"]


def _clean(n: int) -> list[str]:
    return [CLEAN[i % len(CLEAN)] for i in range(n)]


def test_wordlist_is_the_packaged_one():
    assert len(SINGLES) > 250 and len(PHRASES) > 50
    assert not SINGLES & set(CLEAN)


@pytest.mark.parametrize("n,kept", [(100, True), (99, False)])  # 1/100 = 0.01 kept, 1/99 removed
def test_ratio_boundary(n, kept):
    text = " ".join(_clean(n - 1) + [WORD])
    stats: Counter[str] = Counter()
    result = ToxicFilter().apply(text, stats)
    assert (result == text) == kept
    assert stats["toxic_words"] == 1
    if not kept:
        assert result.reason.startswith(f"flagged words 1/{n} = 0.010 > 0.01 (e.g. '{WORD[0]}")
        assert WORD not in result.reason  # masked in reports


@pytest.mark.parametrize("form", ["{w}", "{W}", "{C}!", "({w})", '"{w},"', "{w}-faced", "and/{w}", "*{w}*"])
def test_case_and_punctuation(form):
    token = form.format(w=WORD, W=WORD.upper(), C=WORD.capitalize())
    hits, _, first = ToxicFilter().flagged(f"the river {token} flows")
    assert (hits, first) == (1, WORD)


@pytest.mark.parametrize("text", [f"x{WORD}y", f"{WORD}s1", "Class assignment: pass the analysis."])
def test_whole_tokens_only(text):
    assert ToxicFilter().flagged(text)[0] == 0


def test_phrases_count_their_words():
    text = "We saw " + " ".join(t.upper() for t in PHRASE) + ", then left."
    hits, n, first = ToxicFilter().flagged(text)
    assert (hits, n, first) == (3, 7, " ".join(PHRASE))
    # the words apart are not a hit unless listed alone
    apart = " and ".join(PHRASE)
    assert ToxicFilter().flagged(apart)[0] == sum(t in SINGLES for t in PHRASE)


def test_zero_threshold_is_c4s_any_word_rule():
    text = " ".join(_clean(10_000) + [WORD])
    assert ToxicFilter().apply(text, Counter()) == text
    assert isinstance(ToxicFilter(max_flagged_ratio=0.0).apply(text, Counter()), Removed)


def test_builtin_corpus_kept():
    stage = ToxicFilter()
    assert all(stage.apply(d, Counter()) == d for d in builtin_documents())


def test_other_languages():
    fr_singles, _ = load_wordlist("fr")
    word = next(w for w in sorted(fr_singles) if w.isalpha())
    assert ToxicFilter(languages=("en",)).flagged(word)[0] == (word in SINGLES)
    assert ToxicFilter(languages=("en", "fr")).flagged(word)[0] == 1


@pytest.fixture
def scorer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "prep_scorer_mod.py").write_text(
        "def score(text):\n    return 0.5 if 'borderline' in text else (0.75 if 'nasty' in text else 0.0)\n"
        "def broken(text):\n    return 1.5\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "prep_scorer_mod"


def test_classifier_hook_boundary(scorer):
    stage = ToxicFilter(classifier=f"{scorer}:score", classifier_threshold=0.5)
    assert stage.apply("a borderline remark", Counter()) == "a borderline remark"  # 0.5 is not > 0.5
    assert stage.apply("a nasty remark", Counter()) == Removed(f"classifier {scorer}:score score 0.750 > 0.5")
    clone = pickle.loads(pickle.dumps(stage))
    assert isinstance(clone.apply("a nasty remark", Counter()), Removed)


def test_classifier_errors(scorer):
    with pytest.raises(ValueError, match="toxic.classifier must be 'module:function'"):
        ToxicFilter(classifier="no_colon")
    with pytest.raises(ValueError, match="cannot be loaded"):
        ToxicFilter(classifier=f"{scorer}:missing")
    with pytest.raises(ValueError, match="expected a score in"):
        ToxicFilter(classifier=f"{scorer}:broken").apply("text", Counter())


@pytest.mark.parametrize(
    "kwargs,match",
    [({"languages": ("xx",)}, "toxic.languages"), ({"languages": "en"}, "toxic.languages"),
     ({"max_flagged_ratio": 1.5}, "toxic.max_flagged_ratio"), ({"classifier_threshold": -1}, "toxic.classifier_threshold")],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToxicFilter(**kwargs)


def test_registered_and_picklable():
    stage = pickle.loads(pickle.dumps(build_stage("toxic", {"max_flagged_ratio": 0.0})))
    assert isinstance(stage.apply(f"one {WORD}", Counter()), Removed)


def test_derived_state_is_not_an_option():
    with pytest.raises(ValueError, match=r"unknown option\(s\) _singles; it has classifier, classifier_threshold, "
                                         r"languages, max_flagged_ratio"):
        build_stage("toxic", {"_singles": []})


@pytest.mark.parametrize("text", ["", " \n ", "lone \ud800 surrogate", "a" * 100_000, "😀 " * 50, "--- /// ..."])
def test_odd_inputs_give_a_verdict(text):
    assert isinstance(ToxicFilter().apply(text, Counter()), (str, Removed))
