"""Fixtures for the data tests: the real Omniglot tree, decoded at most once per test session."""

from __future__ import annotations

import pytest

from metarun.data.omniglot import Omniglot


@pytest.fixture(scope="session")
def omniglot(omniglot_root, omniglot_cache) -> Omniglot:
    return Omniglot(
        str(omniglot_root), split="vinyals", download=False, cache_dir=str(omniglot_cache)
    )
