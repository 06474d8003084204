"""Normalize: each rule on hand-written cases (NFC, control characters, whitespace runs, trailing spaces,
blank lines, strip), the empty verdict, and idempotence."""

from __future__ import annotations

import pickle
import unicodedata
from collections import Counter

import pytest

from parallax.data.prep.document import Removed
from parallax.data.prep.normalize import Normalize
from parallax.data.prep.stages import build_stage


def norm(text: str) -> str | Removed:
    return Normalize().apply(text, Counter())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Cafe\u0301", "Caf\u00e9"),  # combining acute composed (NFC)
        ("\u212b ngstr\u00f6m", "\u00c5 ngstr\u00f6m"),  # Angstrom sign -> A with ring (canonical equivalent)
        ("\ufb01ne", "\ufb01ne"),  # NFC, not NFKC: the ligature stays
        ("a\x00b\x07c\x1bd\x7fe\x85f", "abcdef"),  # C0, DEL and C1 controls
        ("a\tb", "a b"),
        ("a \t \t b", "a b"),
        ("a\u00a0\u2003\u3000b", "a b"),  # no-break, em and ideographic spaces
        ("a  b   c", "a b c"),
        ("a\u200bb", "a\u200bb"),  # zero-width space is a format character (Cf), not a control: kept
        ("line  \nnext\t\nlast  ", "line\nnext\nlast"),
        ("a\r\nb\rc", "a\nb\nc"),
        ("a\n\nb", "a\n\nb"),  # two newlines (one blank line) kept
        ("a\n\n\nb", "a\n\nb"),  # three -> two
        ("a\n \n\t\n  \n\nb", "a\n\nb"),  # lines of spaces are blank lines
        ("  \n\n lead and trail \n\n ", "lead and trail"),
        ("  indented\n    more", "indented\n more"),  # runs collapse at line starts too
    ],
)
def test_rules(text: str, expected: str) -> None:
    assert norm(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t\n", "\x00\x01 \x02", "\u3000\u00a0"])
def test_empty_after_normalisation_is_removed(text: str) -> None:
    assert norm(text) == Removed("empty after normalisation")


def test_output_is_nfc_and_a_fixed_point() -> None:
    text = "Ame\u0301lie \x0c  says\u2009hi\r\n\r\n\r\n\tbye  \x00"
    once = norm(text)
    assert isinstance(once, str) and unicodedata.is_normalized("NFC", once)
    assert norm(once) == once


def test_stats_count_changed_documents() -> None:
    stats: Counter[str] = Counter()
    stage = Normalize()
    stage.apply("clean text", stats)
    stage.apply("dirty  text", stats)
    assert stats == {"normalized": 1}


def test_registry_and_pickle() -> None:
    stage = build_stage("normalize")
    assert isinstance(stage, Normalize) and pickle.loads(pickle.dumps(stage)) == stage
    with pytest.raises(ValueError, match="unknown option"):
        build_stage("normalize", {"form": "NFKC"})
