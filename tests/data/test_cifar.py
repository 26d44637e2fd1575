"""CIFAR-FS and FC100 on a small CIFAR-100 release in the real format: split sizes, pixels, the
on-disk cache, and the one-line errors. torchvision reads the fixture through its own md5 check."""

from __future__ import annotations

import os
import shutil

import hydra
import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as torchvision_cifar
from torchvision.datasets import CIFAR100

from metarun.config import validate
from metarun.data.cifar import CIFARFS, FC100
from tests.conftest import compose_config, one_line_error
from tests.fixtures.cifar import (
    COARSE_NAMES,
    FINE_NAMES,
    SUPERCLASSES,
    accept_fixture_md5s,
    read_fixture,
    write_cifar100,
)

PER_CLASS_TRAIN, PER_CLASS_TEST = 4, 2
PARTS = ("train", "val", "test")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar100(root, PER_CLASS_TRAIN, PER_CLASS_TEST)
    return root


@pytest.fixture
def accept(monkeypatch):
    """accept(root): torchvision's CIFAR100 takes the fixture files under root as intact."""

    def accept(root):
        for name, value in accept_fixture_md5s(root).items():
            monkeypatch.setattr(CIFAR100, name, value)

    return accept


@pytest.fixture
def open_dataset(cifar_root, accept, tmp_path):
    """open_dataset(CIFARFS or FC100, **settings) on the fixture, with a cache of its own per test."""
    accept(cifar_root)
    return lambda cls, **settings: cls(
        str(cifar_root), download=False, cache_dir=str(tmp_path / "cache"), **settings
    )


@pytest.fixture
def count_cifar_reads(monkeypatch):
    """A list that grows by one each time torchvision's CIFAR100 unpickles a file set."""
    reads = []
    original = CIFAR100.__init__

    def counting(self, *args, **kwargs):
        reads.append(kwargs.get("train", args[1] if len(args) > 1 else True))
        original(self, *args, **kwargs)

    monkeypatch.setattr(CIFAR100, "__init__", counting)
    return reads


def pooled_release(root) -> tuple[np.ndarray, np.ndarray]:
    """The fixture's images `[N, 3, 32, 32]` and fine labels `[N]`, training images first."""
    train, test = read_fixture(root, "train"), read_fixture(root, "test")
    images = np.concatenate([train["data"], test["data"]]).reshape(-1, 3, 32, 32)
    return images, np.array(train["fine_labels"] + test["fine_labels"])


@pytest.mark.parametrize("cls, sizes", [(CIFARFS, (64, 16, 20)), (FC100, (60, 20, 20))])
def test_parts_have_the_papers_class_counts_of_pooled_images(open_dataset, cls, sizes):
    data = open_dataset(cls)
    for part, n_classes in zip(PARTS, sizes):
        images = data.part(part)
        assert data.n_classes(part) == n_classes
        assert images.counts.tolist() == [PER_CLASS_TRAIN + PER_CLASS_TEST] * n_classes
        assert images.images.shape == (n_classes * (PER_CLASS_TRAIN + PER_CLASS_TEST), 3, 32, 32)
        assert images.images.dtype == torch.uint8


@pytest.mark.parametrize("cls", [CIFARFS, FC100])
def test_parts_share_no_class_and_cover_cifar100(open_dataset, cls):
    data = open_dataset(cls)
    names = {part: set(data.class_names(part)) for part in PARTS}
    assert (
        not names["train"] & names["val"]
        and not names["train"] & names["test"]
        and not names["val"] & names["test"]
    )
    fine = [name.split("/")[1] for part in PARTS for name in data.class_names(part)]
    assert sorted(fine) == FINE_NAMES  # every CIFAR-100 class once


def test_class_names_carry_cifar100s_own_superclass(open_dataset):
    data = open_dataset(CIFARFS)
    for part in PARTS:
        for name in data.class_names(part):
            superclass, fine = name.split("/")
            assert fine in SUPERCLASSES[superclass]
    assert data.class_names("test")[0] == "aquatic_mammals/whale"  # list-file order


def test_fc100_parts_are_whole_superclasses(open_dataset, cifar_root):
    """Checked against the fixture's per-image coarse_labels, not the lists the module reads."""
    train = read_fixture(cifar_root, "train")
    coarse_of = {
        FINE_NAMES[f]: COARSE_NAMES[c] for f, c in zip(train["fine_labels"], train["coarse_labels"])
    }
    data = open_dataset(FC100)
    superclasses = {}
    for part in PARTS:
        fine = [name.split("/")[1] for name in data.class_names(part)]
        superclasses[part] = {coarse_of[f] for f in fine}
        assert len(superclasses[part]) * 5 == len(fine)  # 5 fine classes per listed superclass ...
        assert sorted(fine) == sorted(
            f for s in superclasses[part] for f in SUPERCLASSES[s]
        )  # ... all of them
    assert [len(superclasses[part]) for part in PARTS] == [12, 4, 4]
    assert (
        not superclasses["train"] & superclasses["val"]
        and not superclasses["train"] & superclasses["test"]
    )


def test_class_images_are_the_release_pixels_training_images_first(open_dataset, cifar_root):
    images, labels = pooled_release(cifar_root)
    data = open_dataset(CIFARFS)
    part = data.part("val")
    for c, name in enumerate(part.names):
        expected = images[
            labels == FINE_NAMES.index(name.split("/")[1])
        ]  # [6, 3, 32, 32], release order
        assert torch.equal(part.class_images(c), torch.from_numpy(expected))
    assert 0 < part.images.float().std() and part.images.max() > part.images.min()


def test_resize_and_grey_keep_each_class_colour(open_dataset, cifar_root):
    colour = open_dataset(CIFARFS).part("test")
    small = open_dataset(CIFARFS, image_size=20).part("test")
    grey = open_dataset(CIFARFS, image_size=48, channels=1)
    assert small.images.shape == (20 * 6, 3, 20, 20) and small.images.dtype == torch.uint8
    assert grey.part("test").images.shape == (20 * 6, 1, 48, 48)
    # Antialiased resizing keeps an image's mean colour to within rounding and edge effects.
    mean_32 = colour.images.float().mean((-2, -1))  # [I, 3]
    assert (small.images.float().mean((-2, -1)) - mean_32).abs().max() < 3
    luma = (mean_32 * torch.tensor([0.299, 0.587, 0.114])).sum(-1)  # [I]
    assert (grey.part("test").images.float().mean((-3, -2, -1)) - luma).abs().max() < 3
    assert len(grey.mean) == len(grey.std) == 1 and abs(grey.mean[0] - 0.4877) < 1e-4


@pytest.mark.parametrize("cls", [CIFARFS, FC100])
def test_normalization_is_metaoptnets(open_dataset, cls):
    # Lee et al. (2019), the CIFAR-FS and FC100 loaders of their code: the mean and std of 0-255 pixels / 255.
    data = open_dataset(cls)
    assert data.mean == pytest.approx((0.50736, 0.48669, 0.44109), abs=1e-5)
    assert data.std == pytest.approx((0.26749, 0.25659, 0.27631), abs=1e-5)


def test_settings_scale_augmentation_and_normalization(open_dataset):
    data = open_dataset(FC100)
    assert data.standard_augment == {"crop_padding": 4, "flip": True, "color_jitter": 0.4}
    assert open_dataset(FC100, image_size=84).standard_augment["crop_padding"] == 10
    assert set(data.machine_local) == {"root", "cache_dir", "download"}
    assert data.layout()["layout"] == "CIFAR-100 python release, train+test pooled"
    assert data.layout()["root"].endswith("cifar-100-python")


def test_second_load_reads_the_cache_not_cifar(open_dataset, count_cifar_reads):
    first = open_dataset(FC100)
    built = {part: first.part(part) for part in PARTS}
    assert sorted(count_cifar_reads) == [
        False,
        True,
    ]  # train and test files read once for all three parts
    again = open_dataset(FC100)
    for part in PARTS:
        assert torch.equal(again.part(part).images, built[part].images)
        assert again.class_names(part) == list(built[part].names)
    assert len(count_cifar_reads) == 2


def test_changed_source_file_rebuilds_the_cache(cifar_root, accept, tmp_path, count_cifar_reads):
    root = tmp_path / "cifar100"
    shutil.copytree(cifar_root, root)
    accept(root)
    before = (
        CIFARFS(str(root), download=False, cache_dir=str(tmp_path / "cache")).part("val").images
    )
    write_cifar100(root, PER_CLASS_TRAIN, PER_CLASS_TEST, seed=1)  # new pixels, new md5s
    os.utime(root / "cifar-100-python" / "train", ns=(1, 1))  # an mtime that surely differs
    accept(root)
    after = CIFARFS(str(root), download=False, cache_dir=str(tmp_path / "cache")).part("val").images
    assert len(count_cifar_reads) == 4 and not torch.equal(before, after)


def test_missing_root_without_download_names_the_folder_and_the_fix(tmp_path, count_cifar_reads):
    data = CIFARFS(str(tmp_path / "nowhere"), download=False, cache_dir=str(tmp_path / "cache"))
    message = one_line_error(lambda: data.part("train"))
    assert "cifar-100-python" in message and "cifar-100-python.tar.gz" in message
    assert "dataset.root" in message and "dataset.download=true" in message
    assert count_cifar_reads == []  # nothing attempted, so nothing downloaded


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3]\nTemporary failure in name resolution>")

    monkeypatch.setattr(torchvision_cifar, "download_and_extract_archive", offline)
    data = FC100(str(tmp_path / "data"), download=True, cache_dir=str(tmp_path / "cache"))
    message = one_line_error(lambda: data.part("val"))
    assert "name resolution" in message and "dataset.root" in message


def test_file_that_fails_its_md5_is_one_line(cifar_root, accept, tmp_path):
    root = tmp_path / "cifar100"
    shutil.copytree(cifar_root, root)
    accept(root)
    with open(root / "cifar-100-python" / "test", "r+b") as f:
        f.truncate(1000)  # an interrupted copy
    data = CIFARFS(str(root), download=False, cache_dir=str(tmp_path / "cache"))
    message = one_line_error(lambda: data.part("train"))
    assert (
        "corrupted" in message
        and "cifar-100-python" in message
        and "dataset.download=true" in message
    )


def test_unlisted_class_or_part_is_one_line(open_dataset):
    class Misspelt(CIFARFS):
        def class_list(self, part):
            return ["fish/goldfish"]

    assert "fish/goldfish" in one_line_error(lambda: open_dataset(Misspelt).part("train"))
    assert "train, val, test" in one_line_error(lambda: open_dataset(CIFARFS).part("validation"))
    assert "dataset.channels" in one_line_error(lambda: open_dataset(CIFARFS, channels=2))


@pytest.mark.parametrize("name, cls", [("cifarfs", CIFARFS), ("fc100", FC100)])
def test_config_builds_the_dataset(cifar_root, accept, tmp_path, name, cls):
    accept(cifar_root)
    cfg = compose_config(
        f"dataset={name}",
        f"dataset.root={cifar_root}",
        f"dataset.cache_dir={tmp_path}",
        "dataset.download=false",
    )
    validate(cfg)
    data = hydra.utils.instantiate(cfg.dataset)
    assert type(data) is cls and data.image_size == 32 and data.channels == 3
    assert data.n_classes("val") == {"cifarfs": 16, "fc100": 20}[name]
