"""Omniglot class dataset: split sizes, rotations, decoding and the on-disk cache."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metarun.data.omniglot as omniglot_module
from metarun.data.omniglot import Omniglot
from metarun.errors import MetarunError


def test_vinyals_split_has_4112_688_1692_classes_of_20_images(omniglot):
    for part, n_classes in (("train", 4112), ("val", 688), ("test", 1692)):
        images = omniglot.images(part)
        assert images.shape == (n_classes, 20, 1, 28, 28)
        assert images.dtype == torch.uint8
        assert len(omniglot.class_names(part)) == n_classes
    assert omniglot.class_names("val")[0] == "Hebrew/character01/rot000"
    assert omniglot.name == "omniglot"


def test_vinyals_parts_share_no_character(omniglot):
    characters = {
        part: {n.rsplit("/", 1)[0] for n in omniglot.class_names(part)}
        for part in ("train", "val", "test")
    }
    assert (
        len(characters["train"]) == 1028
        and len(characters["val"]) == 172
        and len(characters["test"]) == 423
    )
    assert not characters["train"] & characters["val"]
    assert not characters["train"] & characters["test"]
    assert not characters["val"] & characters["test"]


def test_rotated_class_is_base_character_turned_counter_clockwise(omniglot):
    names = omniglot.class_names("train")
    images = omniglot.images("train")
    base = images[names.index("Angelic/character01/rot000")]  # [20, 1, S, S]
    turned = images[names.index("Angelic/character01/rot090")]
    # Counter-clockwise by hand: the new top row is the old rightmost column.
    assert torch.equal(turned, base.transpose(-2, -1).flip(-2))
    assert torch.equal(images[names.index("Angelic/character01/rot180")], base.flip(-2).flip(-1))
    assert not torch.equal(turned, base)


def test_images_have_bright_strokes_on_a_black_background(omniglot):
    images = omniglot.images("val")
    assert images.max() == 255
    assert (images == 0).float().mean() > 0.6  # mostly background
    assert images[..., 0, :].float().mean() < 5  # the border row is paper, now black


def test_background_split_tests_on_the_evaluation_alphabets(omniglot_root, omniglot_cache):
    data = Omniglot(
        str(omniglot_root), split="background", download=False, cache_dir=str(omniglot_cache)
    )
    names = {part: data.class_names(part) for part in ("train", "val", "test")}
    assert (len(names["train"]), len(names["val"]), len(names["test"])) == (783, 181, 659)
    assert data.images("test").shape == (659, 20, 1, 28, 28)
    background_alphabets = {
        p.name for p in (omniglot_root / "omniglot-py" / "images_background").iterdir()
    }
    assert len(background_alphabets) == 30
    assert not {n.split("/")[0] for n in names["test"]} & background_alphabets
    assert {
        n.split("/")[0] for n in names["val"]
    } == background_alphabets  # val spans every alphabet
    assert not set(names["train"]) & set(names["val"])
    assert all(int(n.rsplit("character", 1)[1]) % 5 == 0 for n in names["val"])
    assert all("rot" not in n for n in names["train"])


def test_unknown_split_or_part_names_the_valid_choices(omniglot, omniglot_root, omniglot_cache):
    with pytest.raises(MetarunError, match="vinyals, background"):
        Omniglot(str(omniglot_root), split="lake", download=False, cache_dir=str(omniglot_cache))
    with pytest.raises(MetarunError, match="train, val, test"):
        omniglot.images("validation")


def test_missing_root_without_download_raises_a_one_line_error(tmp_path):
    with pytest.raises(MetarunError) as error:
        Omniglot(str(tmp_path / "nowhere"), download=False, cache_dir=str(tmp_path / "cache"))
    message = str(error.value)
    assert "\n" not in message
    assert "omniglot-py/images_background" in message and "dataset.root" in message
    assert "dataset.download=true" in message


def test_failed_download_raises_a_one_line_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure\n in name resolution>")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(MetarunError, match="downloading it failed") as error:
        Omniglot(str(tmp_path), download=True, cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(error.value)


def test_second_construction_loads_the_cache_and_decodes_no_png(
    omniglot, omniglot_root, omniglot_cache, monkeypatch
):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decode_omniglot called although the cache exists")

    monkeypatch.setattr(omniglot_module, "decode_omniglot", no_decoding)
    again = Omniglot(str(omniglot_root), download=False, cache_dir=str(omniglot_cache))
    assert torch.equal(again.images("val"), omniglot.images("val"))


def write_tiny_omniglot(root: Path) -> None:
    """Two alphabets of one character each; drawing d of the background one has ink in row d only."""
    for folder, alphabet in (("images_background", "Latin"), ("images_evaluation", "Keble")):
        character = root / "omniglot-py" / folder / alphabet / "character01"
        character.mkdir(parents=True)
        for d in range(20):
            pixels = np.ones((105, 105), dtype=bool)  # mode "1": True = white paper
            if folder == "images_background":
                pixels[d * 5 : d * 5 + 5, :] = False  # a black bar 5 pixels high
            Image.fromarray(pixels).convert("1").save(character / f"0001_{d + 1:02d}.png")


def test_decoding_inverts_resizes_and_caches_atomically(tmp_path, monkeypatch):
    write_tiny_omniglot(tmp_path / "data")
    calls = []
    decode = omniglot_module.decode_omniglot
    monkeypatch.setattr(
        omniglot_module, "decode_omniglot", lambda *a: calls.append(a) or decode(*a)
    )
    cache = tmp_path / "cache"
    Omniglot(str(tmp_path / "data"), image_size=21, download=False, cache_dir=str(cache))
    payload = torch.load(next(cache.iterdir()), weights_only=True)
    images = payload["images"]  # [2, 20, 1, 21, 21]
    assert images.shape == (2, 20, 1, 21, 21)
    assert payload["names"] == ["Latin/character01", "Keble/character01"]
    assert images[1].max() == 0  # blank paper -> all background
    # 105 -> 21 is a 5x reduction: bar d lands on output row d, bright on black; the antialiasing
    # kernel spreads it to the neighbouring rows but no further.
    assert images[0, 7, 0, 7].min() >= 128 and images[0, 7, 0, 7].max() == images[0, 7].max()
    assert images[0, 7, 0, 9].max() == 0 and images[0, 7, 0, 5].max() == 0
    assert [
        re.fullmatch(r"omniglot-21px-[0-9a-f]{10}\.pt", p.name) is not None for p in cache.iterdir()
    ] == [True]
    assert not list(cache.glob("*.tmp"))

    Omniglot(str(tmp_path / "data"), image_size=21, download=False, cache_dir=str(cache))
    assert len(calls) == 1  # the second construction read the cache
    Omniglot(str(tmp_path / "data"), image_size=14, download=False, cache_dir=str(cache))
    assert len(calls) == 2 and len(list(cache.iterdir())) == 2  # another size is another file
