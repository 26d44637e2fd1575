"""mini-ImageNet class dataset: both layouts, resizing, the cache, and one-line errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

import metarun.data.miniimagenet as miniimagenet_module
from metarun.data.cache import cache_file
from metarun.data.miniimagenet import MiniImageNet
from tests.conftest import one_line_error
from tests.fixtures.miniimagenet import (
    class_colour,
    shipped_rows,
    write_foreign_pickle,
    write_malicious_pickle,
    write_pickles,
    write_ravi,
    write_shipped_part,
)

REPO = Path(__file__).resolve().parents[2]


def load(root: Path, tmp_path: Path, **kwargs) -> MiniImageNet:
    return MiniImageNet(str(root), cache_dir=str(tmp_path / "cache"), **kwargs)


def assert_class_colours(data: MiniImageNet, part: str, tolerance: float = 12) -> None:
    """Each class's mean colour is its fixture colour: images landed under the right class."""
    images = data.part(part)
    for c, wnid in enumerate(images.names):
        mean = images.class_images(c).float().mean(dim=(0, 2, 3)).numpy()  # [3]
        assert np.abs(mean - class_colour(wnid)).max() < tolerance, wnid


@pytest.fixture
def counted_reads(monkeypatch) -> list[int]:
    """How many images each read_images call decoded."""
    calls = []
    real = miniimagenet_module.read_images

    def counting(paths, *args, **kwargs):
        calls.append(len(paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(miniimagenet_module, "read_images", counting)
    return calls


def test_ravi_layout_gives_each_part_its_classes_in_csv_order(tmp_path):
    written = write_ravi(tmp_path / "mini", n_classes_per_part=(4, 2, 3), per_class=6)
    data = load(tmp_path / "mini", tmp_path, image_size=16)
    for part, n_classes in (("train", 4), ("val", 2), ("test", 3)):
        images = data.part(part)
        assert list(images.names) == list(written[part]) == list(shipped_rows(part))[:n_classes]
        assert images.counts.tolist() == [6] * n_classes
        assert (
            images.images.shape == (6 * n_classes, 3, 16, 16) and images.images.dtype == torch.uint8
        )
        assert 0 < images.images.float().std() and images.images.max() <= 255
        assert_class_colours(data, part)
    assert data.class_names("val")[0] == "n01855672"
    assert data.layout()["layout"] == "ravi csv+jpeg (CSVs in root)"


def test_classes_follow_first_appearance_in_the_csv_even_when_rows_interleave(tmp_path):
    written = write_ravi(tmp_path / "mini", n_classes_per_part=(3, 1, 1), per_class=4)
    order = list(written["train"])[::-1]  # not the sorted order of the shipped CSVs
    rows = [
        f"{written['train'][wnid][i]},{wnid}" for i in range(4) for wnid in order
    ]  # class 0, 1, 2, 0, 1, ...
    (tmp_path / "mini" / "train.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    data = load(tmp_path / "mini", tmp_path, image_size=16)
    assert data.class_names("train") == order and data.part("train").counts.tolist() == [4, 4, 4]
    assert_class_colours(data, "train")


def test_jpegs_of_any_size_are_resized_to_image_size(tmp_path):
    write_ravi(tmp_path / "mini", n_classes_per_part=(3, 1, 1), per_class=4, size=(37, 29))
    data = load(tmp_path / "mini", tmp_path, image_size=84)
    assert data.part("train").images.shape == (12, 3, 84, 84)
    assert_class_colours(data, "train")


def test_shipped_csvs_are_used_when_root_has_only_images(tmp_path):
    classes = write_shipped_part(tmp_path / "mini", "val")
    data = load(tmp_path / "mini", tmp_path, image_size=8)
    val = data.part("val")
    assert data.layout()["layout"] == "ravi csv+jpeg (shipped CSVs)"
    assert (val.n_classes, len(val.images)) == (16, 9600)
    assert list(val.names) == list(classes) and val.counts.tolist() == [600] * 16
    assert_class_colours(data, "val", tolerance=20)  # 8x8 images keep little of a stripe's average


def test_images_missing_from_the_shipped_csvs_are_named_and_counted(tmp_path):
    written = write_ravi(
        tmp_path / "mini", n_classes_per_part=(1, 2, 1), per_class=3, with_csvs=False
    )
    message = one_line_error(lambda: load(tmp_path / "mini", tmp_path).part("val"))
    first_missing = shipped_rows("val")[next(iter(written["val"]))][3]
    assert f"{9600 - 2 * 3} files" in message and first_missing in message and "missing" in message


def test_cache_is_reused_on_second_load(tmp_path, counted_reads):
    write_ravi(tmp_path / "mini", per_class=4)
    first = load(tmp_path / "mini", tmp_path, image_size=16)
    images = first.part("train")
    assert first.part("train") is images  # memoized
    assert counted_reads == [20]
    path = cache_file(tmp_path / "cache", "miniimagenet", tmp_path / "mini", "train", "16px", "3c")
    assert path.is_file() and first.layout()["cache"] == str(tmp_path / "cache")
    mtime = path.stat().st_mtime_ns
    again = load(tmp_path / "mini", tmp_path, image_size=16).part("train")
    assert counted_reads == [20] and path.stat().st_mtime_ns == mtime
    assert torch.equal(again.images, images.images) and again.names == images.names


def test_cache_is_rebuilt_when_a_jpeg_changes(tmp_path, counted_reads):
    written = write_ravi(tmp_path / "mini", per_class=4)
    before = load(tmp_path / "mini", tmp_path, image_size=16).part("train").images.clone()
    changed = tmp_path / "mini" / "images" / next(iter(written["train"].values()))[0]
    Image.new("RGB", (24, 20), (255, 255, 255)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    after = load(tmp_path / "mini", tmp_path, image_size=16).part("train").images
    assert counted_reads == [20, 20]
    assert after[0].min() > 240 and not torch.equal(after[0], before[0])
    assert torch.equal(after[1:], before[1:])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_caches_give_class_dict_order_and_exact_images(tmp_path, protocol):
    written = write_pickles(
        tmp_path / "mini",
        n_classes_per_part=(4, 2, 3),
        per_class=5,
        shuffle=True,
        protocol=protocol,
    )
    data = load(tmp_path / "mini", tmp_path)
    assert data.layout()["layout"] == "pickle caches"
    for part in ("train", "val", "test"):
        images, source = data.part(part), written[part]
        assert list(images.names) == list(source["class_dict"])
        assert images.counts.tolist() == [5] * len(source["class_dict"])
        index = np.concatenate(list(source["class_dict"].values()))
        expected = torch.from_numpy(source["image_data"][index]).permute(
            0, 3, 1, 2
        )  # [I, 3, 84, 84]
        assert torch.equal(images.images, expected)


def test_validation_pickle_name_is_accepted(tmp_path):
    written = write_pickles(
        tmp_path / "mini", n_classes_per_part=(1, 3, 1), per_class=2, val_name="validation"
    )
    assert load(tmp_path / "mini", tmp_path).class_names("val") == list(
        written["val"]["class_dict"]
    )


def test_pickle_images_are_resized_and_turned_grey(tmp_path):
    write_pickles(tmp_path / "mini", n_classes_per_part=(3, 1, 1), per_class=4)
    data = load(tmp_path / "mini", tmp_path, image_size=32, channels=1)
    train = data.part("train")
    assert train.images.shape == (12, 1, 32, 32) and train.images.dtype == torch.uint8
    for c, wnid in enumerate(train.names):
        grey = float(np.dot([0.299, 0.587, 0.114], class_colour(wnid)))
        assert abs(train.class_images(c).float().mean() - grey) < 8


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    write_pickles(tmp_path / "mini", per_class=2)
    marker = tmp_path / "pwned"
    write_malicious_pickle(tmp_path / "mini" / "mini-imagenet-cache-train.pkl", marker)
    message = one_line_error(lambda: load(tmp_path / "mini", tmp_path).part("train"))
    assert not marker.exists()
    assert (
        "mini-imagenet-cache-train.pkl" in message and f"{os.system.__module__}.system" in message
    )
    assert "Ravi & Larochelle layout" in message


def test_pickle_of_a_custom_class_is_refused(tmp_path):
    write_pickles(tmp_path / "mini", per_class=2)
    write_foreign_pickle(tmp_path / "mini" / "mini-imagenet-cache-test.pkl")
    message = one_line_error(lambda: load(tmp_path / "mini", tmp_path).part("test"))
    assert "tests.fixtures.miniimagenet.NotAnArray" in message and "refuses" in message


def test_malformed_or_truncated_pickle_is_one_line(tmp_path):
    write_pickles(tmp_path / "mini", per_class=2)
    with open(tmp_path / "mini" / "mini-imagenet-cache-val.pkl", "wb") as f:
        pickle.dump({"data": np.zeros((2, 84, 84, 3), np.uint8), "labels": [0, 1]}, f)
    message = one_line_error(lambda: load(tmp_path / "mini", tmp_path).part("val"))
    assert (
        "mini-imagenet-cache-val.pkl" in message
        and "image_data" in message
        and "class_dict" in message
    )
    train = tmp_path / "mini" / "mini-imagenet-cache-train.pkl"
    train.write_bytes(train.read_bytes()[:1000])
    assert "mini-imagenet-cache-train.pkl is not a mini-ImageNet pickle" in one_line_error(
        lambda: load(tmp_path / "mini", tmp_path).part("train")
    )


def test_missing_root_names_both_layouts(tmp_path):
    message = one_line_error(lambda: load(tmp_path / "nowhere", tmp_path))
    assert f"{tmp_path / 'nowhere' / 'images'}/" in message
    assert "mini-imagenet-cache-{train,val,test}.pkl" in message and "dataset.root" in message
    assert not (tmp_path / "cache").exists()


def test_missing_pickle_part_and_partial_csvs_are_one_line(tmp_path):
    write_pickles(tmp_path / "pkl", per_class=1)
    (tmp_path / "pkl" / "mini-imagenet-cache-test.pkl").unlink()
    assert "mini-imagenet-cache-test.pkl is missing" in one_line_error(
        lambda: load(tmp_path / "pkl", tmp_path)
    )
    write_ravi(tmp_path / "csv", per_class=1)
    (tmp_path / "csv" / "val.csv").unlink()
    assert "but not val.csv" in one_line_error(lambda: load(tmp_path / "csv", tmp_path))


def test_unreadable_jpeg_is_named(tmp_path):
    written = write_ravi(tmp_path / "mini", per_class=3)
    broken = tmp_path / "mini" / "images" / list(written["test"].values())[1][2]
    broken.write_bytes(b"not a jpeg at all")
    message = one_line_error(lambda: load(tmp_path / "mini", tmp_path).part("test"))
    assert "1 file:" in message and str(broken) in message


def test_normalization_and_augmentation_follow_channels_and_size(tmp_path):
    write_pickles(tmp_path / "mini", per_class=1)
    colour = load(tmp_path / "mini", tmp_path)
    assert colour.mean == pytest.approx((0.4721, 0.4533, 0.4100), abs=1e-4)
    assert colour.std == pytest.approx((0.2772, 0.2677, 0.2845), abs=1e-4)
    assert colour.standard_augment == {"crop_padding": 8, "flip": True, "color_jitter": 0.4}
    grey = load(tmp_path / "mini", tmp_path, image_size=32, channels=1)
    assert len(grey.mean) == len(grey.std) == 1 and 0.45 < grey.mean[0] < 0.46
    assert grey.standard_augment["crop_padding"] == 3
    assert load(tmp_path / "mini", tmp_path, image_size=5).standard_augment["crop_padding"] == 1
    assert "no part 'trainval'" in one_line_error(lambda: colour.part("trainval"))
    assert "dataset.channels=2" in one_line_error(
        lambda: load(tmp_path / "mini", tmp_path, channels=2)
    )


def test_config_builds_the_dataset(tmp_path):
    write_pickles(tmp_path / "mini", per_class=1)
    cfg = OmegaConf.load(REPO / "conf" / "dataset" / "miniimagenet.yaml")
    cfg.root, cfg.cache_dir = str(tmp_path / "mini"), str(tmp_path / "cache")
    data = instantiate(cfg)
    assert isinstance(data, MiniImageNet) and (data.image_size, data.channels) == (84, 3)
    assert data.machine_local == ("root", "cache_dir")
