"""PIIScrubber: recall per kind and zero false positives on a labelled set (tests/data/prep/pii_cases.py),
the Luhn and mod-97 checks against published numbers, exact boundaries, options and stats."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest

from parallax.data.prep.pii import DEFAULT_PLACEHOLDERS, PII_KINDS, PIIScrubber, iban_valid, luhn_valid
from parallax.data.prep.stages import build_stage
from tests.data.prep.pii_cases import (
    NEGATIVES,
    PUBLISHED_CARDS,
    PUBLISHED_IBANS,
    negative_cases,
    positive_cases,
)


def test_recall_per_kind_on_the_labelled_set() -> None:
    scrub = PIIScrubber()
    cases = positive_cases(seed=0)
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    misses = []
    for kind, value, text in cases:
        totals[kind] += 1
        stats: Counter[str] = Counter()
        out = scrub.apply(text, stats)
        # Exactly the value is replaced, by its kind's placeholder, counted once under that kind.
        if out == text.replace(value, DEFAULT_PLACEHOLDERS[kind]) and stats == Counter({kind: 1}):
            hits[kind] += 1
        else:
            misses.append((kind, value, out, dict(stats)))
    assert set(totals) == set(PII_KINDS) and min(totals.values()) >= 150
    recall = {k: hits[k] / totals[k] for k in totals}
    assert all(r >= 0.99 for r in recall.values()), (recall, misses[:10])


@pytest.mark.parametrize("text", NEGATIVES + negative_cases(seed=0))
def test_no_false_positives(text: str) -> None:
    stats: Counter[str] = Counter()
    assert PIIScrubber().apply(text, stats) == text
    assert not stats


@pytest.mark.parametrize("number", PUBLISHED_CARDS)
def test_luhn_accepts_published_test_cards(number: str) -> None:
    assert luhn_valid(number)
    # Changing any one digit breaks the checksum (Luhn detects all single-digit errors).
    for i in range(len(number)):
        wrong = number[:i] + str((int(number[i]) + 3) % 10) + number[i + 1:]
        assert not luhn_valid(wrong)


@pytest.mark.parametrize("iban", PUBLISHED_IBANS)
def test_mod97_accepts_published_ibans(iban: str) -> None:
    compact = iban.replace(" ", "")
    assert iban_valid(compact)
    swapped = compact[:4] + compact[5] + compact[4] + compact[6:]  # transposed digits: caught by mod 97
    assert compact[4] == compact[5] or not iban_valid(swapped)
    assert not iban_valid(compact[:-1])  # wrong length for the country
    assert not iban_valid(compact[:2] + f"{(int(compact[2:4]) + 1) % 100:02d}" + compact[4:])


def test_invalid_checksums_are_left_alone() -> None:
    text = "card 4111 1111 1111 1112, iban DE89 3704 0044 0532 0130 01, ip 256.1.1.1, 999.0.0.1"
    stats: Counter[str] = Counter()
    assert PIIScrubber().apply(text, stats) == text and not stats


def test_iban_followed_by_more_groups_keeps_them() -> None:
    out = PIIScrubber().apply("DE89 3704 0044 0532 0130 00 1234 and more", Counter())
    assert out == "<IBAN> 1234 and more"


def test_failed_card_falls_back_to_other_kinds() -> None:
    # "555 123 4567 2024" is a 14-digit card candidate (fails the issuer length and Luhn); the phone
    # number at the same position must still be found.
    stats: Counter[str] = Counter()
    out = PIIScrubber().apply("Tel 555 123 4567 2024 edition", stats)
    assert out == "Tel <PHONE> 2024 edition" and stats == {"phone": 1}


def test_stats_count_every_replacement() -> None:
    text = "a@example.com b@example.org 8.8.8.8 1.1.1.1 2001:db8::1 555-123-4567 4111111111111111"
    stats: Counter[str] = Counter()
    out = PIIScrubber().apply(text, stats)
    assert out == "<EMAIL> <EMAIL> <IP_ADDRESS> <IP_ADDRESS> <IP_ADDRESS> <PHONE> <CREDIT_CARD>"
    assert stats == Counter(email=2, ip=3, phone=1, credit_card=1)


def test_kinds_and_placeholders_are_configurable() -> None:
    scrub = PIIScrubber(kinds=["email"], placeholders={"email": "[redacted]"})
    stats: Counter[str] = Counter()
    assert scrub.apply("x@example.com 8.8.8.8", stats) == "[redacted] 8.8.8.8"
    assert scrub.kinds == ("email",) and stats == {"email": 1}
    # Disabling a kind in the shared numeric pass leaves the others working.
    only_phone = PIIScrubber(kinds=("phone",))
    assert only_phone.apply("4111111111111111 or 555-123-4567", Counter()) == "4111111111111111 or <PHONE>"


def test_placeholder_text_is_literal() -> None:
    scrub = PIIScrubber(placeholders={"secret": r"<\1 \g<0>>"})
    assert scrub.apply("k AKIAIOSFODNN7EXAMPLE", Counter()) == r"k <\1 \g<0>>"


def test_never_removes_and_is_picklable() -> None:
    scrub = build_stage("pii", {"kinds": ["email", "ip"]})
    clone = pickle.loads(pickle.dumps(scrub))
    assert clone == scrub
    assert clone.apply("", Counter()) == ""
    assert clone.apply("mail me: a@example.com", Counter()) == "mail me: <EMAIL>"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kinds": ["mail"]}, "kinds: unknown mail"),
        ({"kinds": "email"}, "kinds must be a list"),
        ({"placeholders": {"fax": "<FAX>"}}, "placeholders: unknown kind fax"),
        ({"placeholders": {"email": 3}}, "placeholders.email must be a string"),
    ],
)
def test_bad_options_name_the_field(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PIIScrubber(**options)
