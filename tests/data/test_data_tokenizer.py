from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from parallax.data import ByteTokenizer

tok = ByteTokenizer()


def test_constants():
    assert tok.vocab_size == 257
    assert tok.eot_id == 256


@given(st.text())
def test_round_trip_any_text(text: str):
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)  # EOT is never produced by encode
    assert tok.decode(ids) == text
    arr = tok.encode_array(text)
    assert arr.dtype == np.uint16 and arr.tolist() == ids


def test_non_ascii_is_multi_byte():
    text = "héllo, 世界 🚀"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert tok.decode(ids) == text


def test_decode_skips_eot_and_accepts_arrays():
    ids = tok.encode("ab") + [tok.eot_id] + tok.encode("cd") + [tok.eot_id]
    assert tok.decode(ids) == "abcd"
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "abcd"
    assert tok.decode(torch.tensor(ids)) == "abcd"
    assert tok.decode([]) == ""


def test_decode_invalid_utf8_is_replaced_not_raised():
    cut = tok.encode("é")[:1]  # first byte of a two-byte character
    assert tok.decode(cut) == "\ufffd"


@pytest.mark.parametrize("bad", [-1, 257, 1000])
def test_decode_rejects_ids_outside_vocab(bad: int):
    with pytest.raises(ValueError, match=str(bad)):
        tok.decode([65, bad])
