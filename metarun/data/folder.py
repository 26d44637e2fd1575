"""Your own image folders as a class dataset: one sub-folder of images per class.

`path` either holds `train/`, `val/` and `test/`, each with class folders (read as given), or the
class folders themselves, split by class: `split=[0.6, 0.2, 0.2]` are the fractions of classes for
train / val / test, dealt out after sorting the classes by name and shuffling them with `seed`, so
a folder and a seed give the same split on every machine. Any file PIL reads, any size, grey or
colour; names starting with "." are ignored. Classes may hold different numbers of images.

Size: the decoded folder is uint8, channels * image_size^2 bytes an image (21 KB at 84x84 RGB, so a
million images take 21 GB). It is decoded once into one cache file, memory-mapped from there on the
CPU (pages load as episodes touch them) and copied whole to the GPU when device=cuda, where it must
then fit. A folder whose decoded size exceeds the free space of the cache dir stops before anything
is decoded.
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from metarun.data.cache import cache_file, load_or_build, source_fingerprint
from metarun.data.contract import PARTS, ClassDataset, ClassImages, check_channels, check_image_size
from metarun.data.images import describe_failures, read_images
from metarun.errors import MetarunError

DEFAULT_SPLIT = (0.6, 0.2, 0.2)
Classes = list[tuple[str, list[Path]]]  # (class name, its files) of one part


def visible(folder: Path) -> list[Path]:
    """The entries of `folder` whose names do not start with ".", sorted by name."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def class_folders(folder: Path) -> Classes:
    """Every sub-folder of `folder` as a class, with the files it holds (empty ones too: they are
    dropped with a warning after decoding, like a class none of whose files PIL reads)."""
    if not folder.is_dir():
        return []
    return [(d.name, [f for f in visible(d) if f.is_file()]) for d in visible(folder) if d.is_dir()]


def split_counts(n_classes: int, split: tuple[float, ...]) -> list[int]:
    """Classes per part: the split's cumulative fractions of n_classes, rounded, so they sum to it."""
    bounds = [0, round(split[0] * n_classes), round((split[0] + split[1]) * n_classes), n_classes]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def working_split(n_classes: int) -> Optional[tuple[float, ...]]:
    """A split that leaves each part at least one of n_classes classes (for error messages)."""
    if n_classes < 3:
        return None
    if min(split_counts(n_classes, DEFAULT_SPLIT)) > 0:
        return DEFAULT_SPLIT
    f = math.ceil(100 / n_classes) / 100  # one class (or a little more) each for val and test
    return (round(1 - 2 * f, 2), f, f)


def override(values) -> str:
    """`[0.6,0.2,0.2]`: a list as a Hydra command-line value."""
    return "[" + ",".join(f"{v:g}" for v in values) + "]"


def is_numbers(values, length: int) -> bool:
    """A list, tuple or ListConfig of `length` ints or floats (not bools, not a string)."""
    return (
        not isinstance(values, (str, bytes))
        and hasattr(values, "__len__")
        and len(values) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    )


def check_split(split, pre_split: bool, path: Path) -> Optional[tuple[float, ...]]:
    if pre_split:
        if split is not None:
            raise MetarunError(
                f"dataset.split={split} cannot apply: {path} is already split into train/val/test "
                "folders; drop dataset.split (set it to null)"
            )
        return None
    if split is None:
        return DEFAULT_SPLIT
    if not is_numbers(split, 3) or min(split) < 0 or not math.isclose(sum(split), 1, abs_tol=1e-6):
        raise MetarunError(
            f"dataset.split={split} must be 3 non-negative fractions of the classes (train, val, "
            f"test) summing to 1; use e.g. dataset.split={override(DEFAULT_SPLIT)}"
        )
    return tuple(float(v) for v in split)


def check_stats(key: str, values, channels: int) -> Optional[tuple[float, ...]]:
    if values is None:
        return None
    if not is_numbers(values, channels) or (key == "std" and min(values) <= 0):
        raise MetarunError(
            f"dataset.{key}={values} must be {channels} numbers, one per channel"
            f"{' and positive' if key == 'std' else ''}; or dataset.{key}=null to compute it "
            "from the train images"
        )
    return tuple(float(v) for v in values)


def channel_stats(images: Tensor, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 `[I, C, H, W]` scaled to [0, 1]: float64 sums over chunks,
    never a float copy of the whole folder."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].double() / 255  # [chunk, C, H, W]
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    n = max(1, len(images) * images.shape[2] * images.shape[3])
    mean = total / n
    return mean.tolist(), (squares / n - mean.square()).clamp_min(0).sqrt().tolist()


class ImageFolder(ClassDataset):
    """The class folders under `path`, pre-split into train/val/test folders or split by class."""

    name = "folder"
    machine_local = ("path", "cache_dir")

    def __init__(
        self,
        path: str,
        split: Optional[list[float]] = None,
        seed: int = 0,
        image_size: int = 84,
        channels: int = 3,
        mean: Optional[list[float]] = None,
        std: Optional[list[float]] = None,
        cache_dir: Optional[str] = None,
    ):
        check_channels(self.name, channels)
        check_image_size(image_size, 84)
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            problem = "is not a directory" if self.path.exists() else "does not exist"
            raise MetarunError(
                f"dataset.path={path} {problem}; "
                "set dataset.path to a folder holding one sub-folder of images per class"
            )
        self.channels, self.image_size, self.seed = channels, image_size, seed
        self.pre_split = any((self.path / part).is_dir() for part in PARTS)
        self.split = check_split(split, self.pre_split, self.path)
        given_mean, given_std = (
            check_stats("mean", mean, channels),
            check_stats("std", std, channels),
        )
        classes = self._classes_per_part()
        files = [f for part in PARTS for _, class_files in classes[part] for f in class_files]
        self.cache = cache_file(cache_dir, self.name, self.path, f"{image_size}px", f"{channels}c")
        # The class names count too: an empty class folder has no file to fingerprint, yet moves the split.
        names = [[name for name, _ in classes[part]] for part in PARTS]
        source = source_fingerprint(files, image_size, channels, self.split, seed, names)
        payload = load_or_build(self.cache, source, lambda: self._decode(classes, files))
        for message in payload[
            "warnings"
        ]:  # repeated on every load: a cached run is missing them too
            warnings.warn(message, stacklevel=2)
        self._parts = {
            part: ClassImages(
                payload[f"{part}_images"],
                payload[f"{part}_counts"],
                tuple(payload[f"{part}_names"]),
            )
            for part in PARTS
        }
        for part in PARTS:
            if self._parts[part].n_classes == 0:
                raise MetarunError(
                    f"no image in the {part} classes of dataset.path={self.path} could be read; "
                    "add readable images to them (any format PIL opens)"
                )
        self.mean = given_mean or tuple(payload["mean"])
        self.std = given_std or tuple(payload["std"])
        self.standard_augment = (
            {"crop_padding": max(1, image_size // 10), "flip": True, "color_jitter": 0.4}
            if channels == 3
            else {"rotate": 10.0, "translate": 0.1, "scale": 0.1}
        )

    def part(self, part: str) -> ClassImages:
        self.check_part(part)
        return self._parts[part]

    def layout(self) -> dict[str, str]:
        how = (
            "pre-split train/val/test folders"
            if self.pre_split
            else f"class folders split {list(self.split)} with seed {self.seed}"
        )
        return {"layout": how, "path": str(self.path), "cache": str(self.cache.parent)}

    def _classes_per_part(self) -> dict[str, Classes]:
        """The class folders of each part, every part holding at least one (else a one-line error)."""
        if self.pre_split:
            classes = {part: class_folders(self.path / part) for part in PARTS}
            present = [part for part in PARTS if (self.path / part).is_dir()]
            for part, found in classes.items():
                if not found:
                    raise MetarunError(
                        f"{self.path} is split into train/val/test folders but {self.path / part} "
                        "holds no class folders; put one sub-folder of images per class in it "
                        f"(or, if {' or '.join(present)} is a class, rename it)"
                    )
            return classes
        found = class_folders(self.path)
        if not found:
            raise MetarunError(
                f"dataset.path={self.path} holds no class folders; "
                "put one sub-folder of images per class in it"
            )
        counts = split_counts(len(found), self.split)
        if min(counts) == 0:
            empty = PARTS[counts.index(0)]
            fix = working_split(len(found))
            fix = (
                f"use e.g. dataset.split={override(fix)}"
                if fix
                else "add class folders (at least 3)"
            )
            raise MetarunError(
                f"dataset.path={self.path} holds {len(found)} class folders and dataset.split="
                f"{override(self.split)} leaves {empty} with none; {fix}"
            )
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(found), generator=generator).tolist()  # found is sorted by name
        starts = [0, counts[0], counts[0] + counts[1], len(found)]
        return {
            part: sorted((found[i] for i in order[a:b]), key=lambda c: c[0])
            for part, a, b in zip(PARTS, starts, starts[1:])
        }

    def _decode(self, classes: dict[str, Classes], files: list[Path]) -> dict:
        """Decode every file (one pass, one progress bar) into the payload the cache file holds."""
        need = len(files) * self.channels * self.image_size**2
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.cache.parent).free
        if need > free:
            raise MetarunError(
                f"decoding {len(files)} images of dataset.path={self.path} at {self.image_size}px needs "
                f"{need / 1e9:.1f} GB but {self.cache.parent} has {free / 1e9:.1f} GB free; use a "
                "smaller dataset.image_size, another dataset.cache_dir or a smaller dataset"
            )
        images, failures = read_images(
            files, self.image_size, self.channels, desc=f"decoding {self.path.name}"
        )
        failed = {path for path, _ in failures}
        readable = torch.tensor([f not in failed for f in files], dtype=torch.bool)  # [I]
        payload, dropped, start = {}, [], 0
        for part in PARTS:
            counts = [sum(f not in failed for f in class_files) for _, class_files in classes[part]]
            end = start + sum(len(class_files) for _, class_files in classes[part])
            part_images = images[
                start:end
            ]  # [I_part, C, S, S], a view: no second copy of a large folder
            if not readable[start:end].all():
                part_images = part_images[
                    readable[start:end]
                ]  # copied only when files were left out
            payload[f"{part}_images"] = part_images
            payload[f"{part}_counts"] = torch.tensor(
                [c for c in counts if c], dtype=torch.long
            )  # [n_classes]
            payload[f"{part}_names"] = [name for (name, _), c in zip(classes[part], counts) if c]
            dropped += [f"{name} ({part})" for (name, _), c in zip(classes[part], counts) if not c]
            start = end
        messages = (
            [f"left out {describe_failures(failures)}, which PIL could not read"]
            if failures
            else []
        )
        if dropped:
            messages.append(
                f"dropped {len(dropped)} class folder{'s' if len(dropped) != 1 else ''} of {self.path} "
                f"with no readable image: {', '.join(dropped[:3])}{' ...' if len(dropped) > 3 else ''}"
            )
        payload["mean"], payload["std"] = channel_stats(payload["train_images"])
        return {**payload, "warnings": messages}
