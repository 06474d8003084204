"""The inference tests run tiny models on one intra-op thread (``tests/conftest.py``)."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_intraop_thread):
    yield
