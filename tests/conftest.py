"""Fixtures shared by the whole suite: where the real Omniglot lives and how to compose a config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("METARUN_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """$METARUN_DATA/omniglot, the folder holding torchvision's omniglot-py/ layout."""
    root = DATA_ROOT / "omniglot"
    if not (root / "omniglot-py" / "images_background").is_dir():
        pytest.skip(f"real Omniglot not found at {root}/omniglot-py; set METARUN_DATA to a folder holding omniglot/")
    return root


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory) -> Path:
    """The decoded-tensor cache: $METARUN_CACHE when set (CI keeps it), else one per test session."""
    return Path(os.environ.get("METARUN_CACHE") or tmp_path_factory.mktemp("metarun-cache"))


def compose_config(*overrides: str) -> DictConfig:
    """The config `metarun OVERRIDES...` would run with (Hydra's compose API, no run directory)."""
    import metarun.config  # noqa: F401  (registers the schema)

    with initialize_config_module("metarun.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture
def make_config(omniglot_root, omniglot_cache):
    """compose_config on the real data with a test-sized default run: CPU, few steps, few episodes."""

    def make(*overrides: str) -> DictConfig:
        return compose_config(
            f"dataset.root={omniglot_root}", f"dataset.cache_dir={omniglot_cache}", "dataset.download=false",
            "device=cpu", "train.steps=20", "train.val_every=10", "train.val_episodes=20", "train.log_every=5",
            "eval.episodes=50", "eval.batch_size=25", *overrides,
        )

    return make
