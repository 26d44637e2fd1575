"""ImageFolder: your own class folders, pre-split or split by class, ragged, cached."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

import metarun.data.folder as folder_module
from metarun.data.contract import PARTS
from metarun.data.folder import ImageFolder
from tests.conftest import compose_config, one_line_error
from tests.fixtures.folder import folder_image, write_folder


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def load(root: Path, cache: Path, **kwargs) -> ImageFolder:
    return ImageFolder(str(root), cache_dir=str(cache), **{"image_size": 16, **kwargs})


def all_counts(data: ImageFolder) -> dict[str, int]:
    return {
        name: int(n)
        for part in PARTS
        for name, n in zip(data.part(part).names, data.part(part).counts)
    }


def test_ragged_class_sizes_are_kept_exactly_as_written(tmp_path, cache):
    written = write_folder(tmp_path / "images")
    assert len(set(written.counts.values())) > 3  # the fixture really is ragged
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # hidden .DS_Store files and .thumbnails/ are not even tried
        data = load(written.root, cache)
    assert all_counts(data) == written.counts
    for part in PARTS:
        images = data.part(part)
        assert len(images.images) == sum(written.counts[name] for name in images.names)


def test_split_deals_classes_by_fraction_the_same_way_every_time(tmp_path, cache):
    written = write_folder(tmp_path / "images", n_classes=12)
    data = load(written.root, cache, split=[0.6, 0.2, 0.2], seed=0)
    names = {part: data.class_names(part) for part in PARTS}
    # Cumulative fractions of 12 classes rounded: 7.2 -> 7, 9.6 -> 10, so 7 / 3 / 2.
    assert [len(names[part]) for part in PARTS] == [7, 3, 2]
    assert sorted(sum(names.values(), [])) == sorted(written.counts)
    again = load(written.root, tmp_path / "other-cache", split=[0.6, 0.2, 0.2], seed=0)
    assert again.class_names("val") == names["val"]
    assert load(written.root, cache, seed=1).class_names("train") != names["train"]


def test_default_split_is_60_20_20_with_seed_0(tmp_path, cache):
    written = write_folder(tmp_path / "images", n_classes=10)
    data = load(written.root, cache)
    assert [data.n_classes(part) for part in PARTS] == [6, 2, 2]
    assert data.layout() == {
        "layout": "class folders split [0.6, 0.2, 0.2] with seed 0",
        "path": str(written.root),
        "cache": str(data.cache.parent),
    }


def test_pre_split_folders_are_read_as_given(tmp_path, cache):
    written = write_folder(tmp_path / "images", n_classes=8, pre_split=True)
    data = load(written.root, cache)
    assert {part: data.class_names(part) for part in PARTS} == written.parts
    assert all_counts(data) == written.counts
    assert data.layout()["layout"] == "pre-split train/val/test folders"


def test_grey_image_comes_out_with_three_equal_channels(tmp_path, cache):
    written = write_folder(
        tmp_path / "images", n_classes=3, sizes=[4, 4, 4], grey_every=2, pre_split=True
    )
    data = load(written.root, cache)
    train = data.part("train").class_images(0)  # [4, 3, S, S]: images 0 and 2 were saved grey
    assert train.shape == (4, 3, 16, 16)
    assert torch.equal(train[0, 0], train[0, 1]) and torch.equal(train[0, 0], train[0, 2])
    assert not torch.equal(train[1, 0], train[1, 2])  # colour images keep their colour


def test_channels_1_gives_grey_images(tmp_path, cache):
    written = write_folder(tmp_path / "images", grey_every=3)
    data = load(written.root, cache, channels=1)
    assert data.part("train").image_shape == (1, 16, 16)
    assert len(data.mean) == len(data.std) == 1
    assert "rotate" in data.standard_augment


def test_images_are_uint8_resized_to_image_size(tmp_path, cache):
    written = write_folder(tmp_path / "images", image_size=lambda c, i: (30 + 7 * i, 90 - 5 * c))
    data = load(written.root, cache, image_size=24)
    for part in PARTS:
        images = data.part(part).images
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 24, 24)
        assert images.float().std() > 10 and int(images.max()) <= 255  # content, not zeros
    assert data.standard_augment == {"crop_padding": 2, "flip": True, "color_jitter": 0.4}


def test_decoded_image_matches_the_file_resized(tmp_path, cache):
    written = write_folder(tmp_path / "images", n_classes=3, pre_split=True, image_size=40)
    data = load(written.root, cache)
    with Image.open(written.root / "train" / "class00" / "000.png") as img:
        expected = np.asarray(
            img.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
        ).transpose(2, 0, 1)
    assert np.array_equal(data.part("train").class_images(0)[0].numpy(), expected)


def test_unreadable_file_is_named_in_a_warning_and_left_out(tmp_path, cache):
    written = write_folder(tmp_path / "images", bad_files=1)
    with pytest.warns(UserWarning, match=r"1 file: .*broken\.jpg"):
        data = load(written.root, cache)
    assert (
        all_counts(data)["class00"] == written.counts["class00"]
    )  # the broken file is not counted
    with pytest.warns(UserWarning, match="broken.jpg"):  # said again when the cache is reused
        load(written.root, cache)


def test_class_with_no_readable_image_is_dropped_with_a_warning(tmp_path, cache):
    written = write_folder(tmp_path / "images", n_classes=5, pre_split=True)
    broken = written.root / "train" / "zz_broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning) as record:
        data = load(written.root, cache)
    messages = [str(w.message) for w in record]
    assert any("zz_broken/a.jpg" in m and m.startswith("left out 1 file") for m in messages)
    assert any(
        m.startswith("dropped 1 class folder") and "zz_broken (train)" in m for m in messages
    )
    assert "zz_broken" not in data.class_names("train")
    assert data.class_names("train") == written.parts["train"]


def test_mean_and_std_are_computed_from_the_train_images(tmp_path, cache):
    written = write_folder(tmp_path / "images")
    data = load(written.root, cache)
    train = data.part("train").images.numpy().astype(np.float64) / 255  # [I, 3, S, S]
    assert np.allclose(data.mean, train.mean((0, 2, 3)), atol=1e-6)
    assert np.allclose(data.std, train.std((0, 2, 3)), atol=1e-6)
    given = load(written.root, cache, mean=[0.5, 0.5, 0.5], std=(0.25, 0.25, 0.25))
    assert given.mean == (0.5, 0.5, 0.5) and given.std == (0.25, 0.25, 0.25)


def test_cache_is_reused_then_rebuilt_when_a_file_is_added(tmp_path, cache, monkeypatch):
    calls = []
    real_read_images = folder_module.read_images
    monkeypatch.setattr(
        folder_module,
        "read_images",
        lambda paths, *a, **k: calls.append(len(paths)) or real_read_images(paths, *a, **k),
    )
    written = write_folder(tmp_path / "images", n_classes=6, pre_split=True)
    first = load(written.root, cache)
    second = load(written.root, cache)
    assert len(calls) == 1 and all_counts(second) == all_counts(first)
    assert len(list(cache.iterdir())) == 1  # one cache file for the whole folder
    Image.fromarray(folder_image(0, 99, 20, 20, seed=0)).save(
        written.root / "train" / "class00" / "new.png"
    )
    third = load(written.root, cache)
    assert len(calls) == 2 and calls[1] == calls[0] + 1
    assert all_counts(third)["class00"] == written.counts["class00"] + 1


def test_fixture_classes_are_told_apart_by_their_mean_image(tmp_path, cache):
    data = load(write_folder(tmp_path / "images", pre_split=True).root, cache, image_size=12)
    train = data.part("train")
    flat = train.images.float().flatten(1)  # [I, 3*12*12]
    labels = torch.repeat_interleave(torch.arange(train.n_classes), train.counts)
    centroids = torch.stack([flat[labels == c].mean(0) for c in range(train.n_classes)])
    assert (torch.cdist(flat, centroids).argmin(1) == labels).float().mean() > 0.95


def test_hydra_config_builds_the_dataset_with_a_list_split(tmp_path, cache):
    written = write_folder(tmp_path / "images", n_classes=10)
    cfg = compose_config(
        "dataset=folder",
        f"dataset.path={written.root}",
        f"dataset.cache_dir={cache}",
        "dataset.split=[0.5,0.3,0.2]",
        "dataset.image_size=16",
    )
    data = instantiate(cfg.dataset)
    assert isinstance(data, ImageFolder) and [data.n_classes(part) for part in PARTS] == [5, 3, 2]
    assert data.machine_local == ("path", "cache_dir")


def test_missing_path_is_one_line_error(tmp_path, cache):
    assert "does not exist" in one_line_error(lambda: load(tmp_path / "nowhere", cache))
    (tmp_path / "file.txt").write_text("x")
    assert "not a directory" in one_line_error(lambda: load(tmp_path / "file.txt", cache))


def test_folder_without_class_folders_is_one_line_error(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "loose.png").write_bytes(b"")
    assert "no class folders" in one_line_error(lambda: load(tmp_path / "empty", cache))


def test_split_leaving_a_part_without_classes_says_what_would_work(tmp_path, cache):
    written = write_folder(tmp_path / "images", n_classes=3)
    message = one_line_error(lambda: load(written.root, cache))
    assert "3 class folders" in message and "leaves val with none" in message
    assert "dataset.split=[0.32,0.34,0.34]" in message
    assert [load(written.root, cache, split=[0.32, 0.34, 0.34]).n_classes(p) for p in PARTS] == [
        1,
        1,
        1,
    ]
    written = write_folder(tmp_path / "more", n_classes=10)
    assert "dataset.split=[0.6,0.2,0.2]" in one_line_error(
        lambda: load(written.root, cache, split=[1, 0, 0])
    )


def test_missing_part_of_a_pre_split_folder_is_one_line_error(tmp_path, cache):
    written = write_folder(tmp_path / "images", n_classes=4, pre_split=True)
    for class_folder in (written.root / "test").iterdir():
        for file in class_folder.iterdir():
            file.unlink()
        class_folder.rmdir()
    assert "holds no class folders" in one_line_error(lambda: load(written.root, cache))


@pytest.mark.parametrize(
    "split", [[0.5, 0.5], [0.6, 0.3, 0.3], [1.2, -0.1, -0.1], ["a", "b", "c"], 0.6]
)
def test_bad_split_values_are_one_line_error(tmp_path, cache, split):
    written = write_folder(tmp_path / "images", n_classes=5, sizes=[1] * 5)
    assert "summing to 1" in one_line_error(lambda: load(written.root, cache, split=split))


def test_split_given_for_a_pre_split_folder_says_to_drop_it(tmp_path, cache):
    written = write_folder(tmp_path / "images", n_classes=4, sizes=[1] * 4, pre_split=True)
    assert "drop dataset.split" in one_line_error(
        lambda: load(written.root, cache, split=[0.6, 0.2, 0.2])
    )


def test_mean_of_the_wrong_length_is_one_line_error(tmp_path, cache):
    written = write_folder(tmp_path / "images", n_classes=5, sizes=[1] * 5)
    assert "one per channel" in one_line_error(lambda: load(written.root, cache, mean=[0.5]))


def test_folder_too_large_for_the_cache_disk_stops_before_decoding(tmp_path, cache, monkeypatch):
    written = write_folder(tmp_path / "images", n_classes=5, sizes=[2] * 5)
    monkeypatch.setattr(
        folder_module.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})()
    )
    monkeypatch.setattr(folder_module, "read_images", lambda *a, **k: pytest.fail("decoded anyway"))
    message = one_line_error(lambda: load(written.root, cache, image_size=84))
    assert "dataset.image_size" in message and "dataset.cache_dir" in message
