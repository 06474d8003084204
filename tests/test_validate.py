"""parallax.validate: what counts as an integer or a number, and errors that name the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallax.validate import is_int, is_real, non_negative_int, positive_int, positive_number


def test_integers_are_python_numpy_and_0d_integer_tensors_but_never_bools():
    assert all(is_int(x) for x in (3, np.int64(3), torch.tensor(3)))
    assert not any(is_int(x) for x in (True, 3.0, torch.tensor(3.0), torch.tensor([3]), torch.tensor(True), "3"))
    assert all(is_real(x) for x in (3, 3.5, np.float32(3.5)))
    assert not any(is_real(x) for x in (False, "3", None))


@pytest.mark.parametrize("check, value, message", [
    (positive_int, 0, "size must be a positive integer, got 0"),
    (positive_int, True, "size must be a positive integer, got True"),
    (positive_int, 2.0, "size must be a positive integer, got 2.0"),
    (non_negative_int, -1, "size must be a non-negative integer, got -1"),
    (positive_number, float("inf"), "size must be a positive finite number, got inf"),
    (positive_number, 0, "size must be a positive finite number, got 0"),
])
def test_bad_values_are_named(check, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check("size", value)


def test_good_values_come_back_as_python_numbers():
    assert positive_int("n", np.int32(4)) == 4 and type(positive_int("n", torch.tensor(4))) is int
    assert non_negative_int("n", 0) == 0
    assert positive_number("x", 2) == 2.0
    assert positive_number("g", 1.5, above_one=True) == 1.5
    with pytest.raises(ValueError, match="g must be a number > 1"):
        positive_number("g", 1.0, above_one=True)
    with pytest.raises(ValueError, match=r"b must be a number in \(0, 1\)"):
        positive_number("b", 1.0, below_one=True)
