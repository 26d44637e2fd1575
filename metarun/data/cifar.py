"""CIFAR-FS and FC100: CIFAR-100 split into few-shot parts by class.

Krizhevsky (2009), "Learning Multiple Layers of Features from Tiny Images": CIFAR-100 holds 100 fine
classes grouped into 20 superclasses of 5, each class 500 training and 100 test images of 32x32
colour; here the two are pooled into 600 images per class.

- CIFAR-FS, Bertinetto et al. (2019), "Meta-learning with differentiable closed-form solvers":
  64 / 16 / 20 fine classes drawn at random.
- FC100, Oreshkin et al. (2018), "TADAM: Task dependent adaptive metric for improved few-shot
  learning": 12 / 4 / 4 whole superclasses (60 / 20 / 20 fine classes), so that test classes are
  semantically far from the training classes.

The class lists ship in metarun/splits/cifar-fs and metarun/splits/fc100 (see SOURCE.md).
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarun.data.cache import cache_file, load_or_build, source_fingerprint
from metarun.data.contract import (
    PARTS,
    ClassDataset,
    ClassImages,
    check_channels,
    check_image_size,
    colour_stats,
    to_channels,
)
from metarun.data.download import one_line
from metarun.data.images import resize
from metarun.errors import MetarunError

SPLITS = Path(__file__).resolve().parent.parent / "splits"
FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
# The normalization of MetaOptNet's CIFAR-FS and FC100 loaders (Lee et al., 2019; repository
# kjunelee/MetaOptNet, data/CIFAR_FS.py and data/FC100.py): per-channel mean and std in 0-255 pixel
# values, divided by 255. One grey channel gets the luma-weighted value.
MEAN = tuple(
    v / 255 for v in (129.37731888, 124.10583864, 112.47758569)
)  # (0.5074, 0.4867, 0.4411)
STD = tuple(v / 255 for v in (68.20947949, 65.43124043, 70.45866994))  # (0.2675, 0.2566, 0.2763)


def read_class_list(folder: str, part: str) -> list[str]:
    """The lines of metarun/splits/<folder>/<part>.txt, in order."""
    return (SPLITS / folder / f"{part}.txt").read_text().split()


def superclasses() -> dict[str, list[str]]:
    """CIFAR-100's superclass -> its 5 fine classes, in CIFAR-100's (alphabetical) label order."""
    # CIFAR-FS's lists name all 100 fine classes as "superclass/fine", i.e. CIFAR-100's own grouping:
    # reading them is simpler than shipping a second table, and cheaper than unpickling the 150 MB
    # train file a second time for its per-image coarse_labels.
    groups: dict[str, list[str]] = {}
    for line in sorted(line for part in PARTS for line in read_class_list("cifar-fs", part)):
        superclass, fine = line.split("/")
        groups.setdefault(superclass, []).append(fine)
    return groups


def not_found(root: str, reason: str) -> MetarunError:
    return MetarunError(
        f"CIFAR-100 under {root} is missing or corrupted ({reason}); expected {FOLDER}/{{train,test,meta}} "
        f"there, as extracted from {URL}; set dataset.root to the folder holding {FOLDER}/, "
        "or dataset.download=true where the network allows"
    )


def read_cifar100(root: str, download: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """torchvision's md5-checked read of root/cifar-100-python, training images then test images.

    Returns uint8 `[60000, 32, 32, 3]` (HWC), fine labels `[60000]`, and the 100 fine class names.
    """
    # Imported here: a part found in the cache never needs torchvision.
    from torchvision.datasets import CIFAR100

    try:
        train = CIFAR100(
            root, train=True, download=download
        )  # downloads the whole release if allowed
        test = CIFAR100(root, train=False)
    except Exception as e:  # missing, bad md5, offline, proxy: all end the same way for the user
        raise not_found(root, one_line(e)) from None
    return (
        np.concatenate([train.data, test.data]),
        np.array(train.targets + test.targets),
        list(train.classes),
    )


class CIFAR100Split(ClassDataset):
    """CIFAR-100's images grouped by fine class, for parts whose classes `class_list` names.

    A class is its 600 images, training images first, each group in CIFAR-100's file order; the
    classes of a part come in the order of its list. Each part is decoded once into the shared cache.
    """

    machine_local = ("root", "cache_dir", "download")

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        download: bool = True,
        cache_dir: str | None = None,
    ):
        check_channels(self.name, channels)
        check_image_size(image_size, example=32)
        self.root, self.image_size, self.channels = str(root), image_size, channels
        self.download, self.cache_dir = download, cache_dir
        self.mean, self.std = colour_stats(MEAN, STD, channels)
        # CIFAR's usual 4-pixel padded crop at 32x32, scaled with the image.
        self.standard_augment = {
            "crop_padding": max(1, round(4 * image_size / 32)),
            "flip": True,
            "color_jitter": 0.4,
        }
        self._parts: dict[str, ClassImages] = {}
        self._cifar: tuple[np.ndarray, np.ndarray, list[str]] | None = (
            None  # read only on a cache miss
        )

    @abstractmethod
    def class_list(self, part: str) -> list[str]:
        """The classes of `part` as "superclass/fine_class", in the list file's order."""

    def part(self, part: str) -> ClassImages:
        self.check_part(part)
        if part not in self._parts:  # built on first use, then kept
            names = self.class_list(part)
            source = source_fingerprint(self._source_files(), names, self.image_size, self.channels)
            payload = load_or_build(
                self._cache_file(part), source, lambda: self._build(part, names)
            )
            self._parts[part] = ClassImages(
                payload["images"], payload["counts"], tuple(payload["names"])
            )
        return self._parts[part]

    def layout(self) -> dict[str, str]:
        return {
            "layout": "CIFAR-100 python release, train+test pooled",
            "root": str(Path(self.root).expanduser() / FOLDER),
            "cache": str(self._cache_file("train").parent),
        }

    def _cache_file(self, part: str) -> Path:
        return cache_file(
            self.cache_dir, self.name, self.root, part, f"{self.image_size}px", f"{self.channels}c"
        )

    def _source_files(self) -> list[Path]:
        """root/cifar-100-python/{train,test,meta}, downloaded first when one is missing and allowed."""
        files = [Path(self.root).expanduser() / FOLDER / name for name in FILES]
        missing = [f.name for f in files if not f.is_file()]
        if missing and not self.download:
            raise not_found(self.root, f"no {FOLDER}/{', '.join(missing)}")
        if missing:
            self._read()  # a fresh download has to be decoded anyway
        return files

    def _read(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if self._cifar is None:  # one read serves every part built by this instance
            self._cifar = read_cifar100(self.root, self.download)
        return self._cifar

    def _build(self, part: str, names: list[str]) -> dict[str, Any]:
        images, labels, classes = self._read()
        label_of = {fine: label for label, fine in enumerate(classes)}
        per_class = []
        for name in names:
            fine = name.rsplit("/", 1)[-1]
            if fine not in label_of:
                raise MetarunError(
                    f"class {name} of {self.name}/{part} is not a CIFAR-100 fine class; correct "
                    "its list in metarun/splits/ (or reinstall metarun)"
                )
            chosen = torch.from_numpy(images[labels == label_of[fine]]).permute(
                0, 3, 1, 2
            )  # [600, 3, 32, 32]
            per_class.append(
                resize(to_channels(chosen, self.channels), self.image_size)
            )  # [600, C, S, S]
        built = ClassImages.from_classes(per_class, names)
        return {"images": built.images, "counts": built.counts, "names": list(names)}


class CIFARFS(CIFAR100Split):
    """CIFAR-FS (Bertinetto et al., 2019): 64 / 16 / 20 randomly drawn fine classes."""

    name = "cifarfs"

    def class_list(self, part: str) -> list[str]:
        return read_class_list("cifar-fs", part)


class FC100(CIFAR100Split):
    """FC100 (Oreshkin et al., 2018): 12 / 4 / 4 superclasses, each all 5 of its fine classes."""

    name = "fc100"

    def class_list(self, part: str) -> list[str]:
        groups, listed = superclasses(), read_class_list("fc100", part)
        unknown = [superclass for superclass in listed if superclass not in groups]
        if unknown:
            raise MetarunError(
                f"superclass {unknown[0]} of fc100/{part} is not a CIFAR-100 superclass; "
                f"correct metarun/splits/fc100/{part}.txt (or reinstall metarun)"
            )
        return [f"{superclass}/{fine}" for superclass in listed for fine in groups[superclass]]
