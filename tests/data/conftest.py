"""Shared fixtures for the data-layer tests: every test gets its own cache root, never ~/.cache."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PARALLAX_CACHE_DIR for this test; token caches land in ``<root>/data``."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PARALLAX_CACHE_DIR", str(root))
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "inputs"
    d.mkdir()
    return d

