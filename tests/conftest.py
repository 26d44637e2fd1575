"""Fixtures shared by the whole suite: where the data lives and how to compose a config.

Omniglot is the real dataset ($METARUN_DATA). The other datasets are small fixtures written in
their real formats (tests/fixtures/), with class-dependent synthetic images a model can learn.
"""

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
        pytest.skip(
            f"real Omniglot not found at {root}/omniglot-py; set METARUN_DATA to a folder holding omniglot/"
        )
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


# Test-sized runs: CPU, few steps, few episodes.
SMALL_RUN = (
    "device=cpu",
    "train.steps=20",
    "train.val_every=10",
    "train.val_episodes=20",
    "train.log_every=5",
    "eval.episodes=50",
    "eval.batch_size=25",
    "eval.base_images=500",
)
COLOUR_DATASETS = ("miniimagenet", "cifarfs", "fc100", "folder")
FIXTURE_IMAGE_SIZE = (
    16  # the fixtures' images are decoded at 16x16: fast, and enough to tell classes apart
)


@pytest.fixture(scope="session")
def colour_datasets(tmp_path_factory) -> dict[str, tuple[str, ...]]:
    """{dataset: the overrides that read its fixture}: each colour dataset written once per session.

    torchvision checks CIFAR-100's files against the real release's md5s; for the session it is
    told the fixture's md5s instead, so its real integrity check still runs.
    """
    from tests.fixtures.cifar import accept_fixture_md5s, write_cifar100
    from tests.fixtures.folder import write_folder
    from tests.fixtures.miniimagenet import write_ravi

    root = tmp_path_factory.mktemp("colour-data")
    cache = f"dataset.cache_dir={root / 'cache'}"
    size = f"dataset.image_size={FIXTURE_IMAGE_SIZE}"
    write_ravi(root / "miniimagenet", n_classes_per_part=(10, 5, 5), per_class=8)
    write_cifar100(root / "cifar100", per_class_train=6, per_class_test=2)
    # 15 / 5 / 5 classes of 6 to 12 images: ragged, and enough for MANN's 5-shot 1-query recipe
    write_folder(root / "folder", n_classes=25, sizes=lambda c: 6 + (3 * c) % 7)
    patch = pytest.MonkeyPatch()
    for name, value in accept_fixture_md5s(root / "cifar100").items():
        patch.setattr(f"torchvision.datasets.CIFAR100.{name}", value)
    yield {
        "miniimagenet": (
            "dataset=miniimagenet",
            f"dataset.root={root / 'miniimagenet'}",
            size,
            cache,
        ),
        "cifarfs": (
            "dataset=cifarfs",
            f"dataset.root={root / 'cifar100'}",
            "dataset.download=false",
            size,
            cache,
        ),
        "fc100": (
            "dataset=fc100",
            f"dataset.root={root / 'cifar100'}",
            "dataset.download=false",
            size,
            cache,
        ),
        "folder": ("dataset=folder", f"dataset.path={root / 'folder'}", size, cache),
    }
    patch.undo()


@pytest.fixture
def make_config(request, omniglot_cache):
    """compose_config for a test-sized run on a dataset: Omniglot (the real data) unless `dataset=`
    names one of COLOUR_DATASETS, whose fixture is then used."""

    def make(*overrides: str, dataset: str = "omniglot") -> DictConfig:
        if dataset == "omniglot":
            root = request.getfixturevalue("omniglot_root")
            data = (
                "dataset=omniglot",
                f"dataset.root={root}",
                f"dataset.cache_dir={omniglot_cache}",
                "dataset.download=false",
            )
        else:
            data = request.getfixturevalue("colour_datasets")[dataset]
        return compose_config(*data, *SMALL_RUN, *overrides)

    return make


@pytest.fixture(scope="session")
def float64_tasks(omniglot_root, omniglot_cache, tmp_path_factory) -> dict:
    """{meta-batch size: Omniglot training tasks in float64}."""
    import torch

    from metarun.trainer import Trainer

    cfg = compose_config(
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
        *SMALL_RUN,
    )
    sampler = Trainer(cfg, tmp_path_factory.mktemp("sampler")).samplers["train"]
    batches = {}
    for meta_batch in (3, 4, 8):
        tasks = sampler.sample(meta_batch, torch.Generator().manual_seed(meta_batch))
        tasks.support_x, tasks.query_x = tasks.support_x.double(), tasks.query_x.double()
        batches[meta_batch] = tasks
    return batches


def one_line_error(call) -> str:
    """The message of the MetarunError that `call()` raises, checked to be one line: problem; fix."""
    from metarun.errors import MetarunError

    with pytest.raises(MetarunError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and ";" in message
    return message


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped where torch sees no CUDA device (scripts/gpu_check.sh runs
    them). metarun's own functions named test_* (run_dir.test_results, ...) imported into a test
    module are not tests: pytest would collect them and fail on their arguments."""
    import torch

    items[:] = [
        item
        for item in items
        if not getattr(getattr(item, "function", None), "__module__", "").startswith("metarun.")
    ]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
