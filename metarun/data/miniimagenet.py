"""mini-ImageNet as a class dataset.

Vinyals et al. (2016), "Matching Networks for One Shot Learning": 100 ImageNet classes of 600
images each, 84x84x3. The split used everywhere since is Ravi & Larochelle (2017), "Optimization
as a Model for Few-Shot Learning": 64 train / 16 val / 20 test classes, listed in their CSVs
(shipped in metarun/splits/miniimagenet-ravi).

Two forms are read, whichever is found under `root`:
    ravi csv+jpeg   root/images/*.jpg with train/val/test.csv in root (else the shipped CSVs)
    pickle caches   root/mini-imagenet-cache-{train,val,test}.pkl ("validation" also accepted),
                    each {"image_data": uint8 [N, 84, 84, 3], "class_dict": {name: [indices]}}
Each part is decoded once into the shared cache (metarun.data.cache) and memory-mapped after.
"""

from __future__ import annotations

import codecs
import csv
import pickle
from pathlib import Path

import numpy as np
import torch

from metarun.data.cache import cache_file, default_cache_dir, load_or_build, source_fingerprint
from metarun.data.contract import (
    ClassDataset,
    ClassImages,
    check_channels,
    check_image_size,
    colour_stats,
    to_channels,
)
from metarun.data.images import describe_failures, read_images, resize
from metarun.errors import MetarunError

try:  # numpy >= 2 moved numpy.core to numpy._core; pickles name either, whichever numpy wrote them
    from numpy._core import multiarray, numeric
except ImportError:
    from numpy.core import multiarray, numeric

SHIPPED_CSVS = Path(__file__).resolve().parent.parent / "splits" / "miniimagenet-ravi"
PICKLE_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
# MetaOptNet / LibFewShot statistics of mini-ImageNet's training images, on the 0..255 scale.
MEAN = tuple(v / 255 for v in (120.39586422, 115.59361427, 104.54012653))
STD = tuple(v / 255 for v in (70.68188272, 68.27635443, 72.54505529))
# Exactly what a numpy array needs to be rebuilt from a pickle, under both numpy's module names.
NUMPY_CORES = ("numpy.core", "numpy._core")
SAFE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles carry bytes
    **{(f"{core}.multiarray", "_reconstruct"): multiarray._reconstruct for core in NUMPY_CORES},
    **{
        (f"{core}.multiarray", "scalar"): multiarray.scalar for core in NUMPY_CORES
    },  # numpy ints in class_dict
    **{
        (f"{core}.numeric", "_frombuffer"): numeric._frombuffer for core in NUMPY_CORES
    },  # protocol 5
}


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, strings and numbers, and refuses every other global
    (a pickle can name any callable, os.system included, and have it called while loading)."""

    def __init__(self, file, path: Path):
        super().__init__(
            file, encoding="latin1"
        )  # latin1: what numpy arrays pickled by Python 2 need
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise MetarunError(
                f"{self.path} holds {module}.{name}, which metarun refuses to unpickle (a pickle can run code); "
                "use the Ravi & Larochelle layout (JPEGs in dataset.root/images/) or a pickle of plain numpy arrays"
            )
        return SAFE_GLOBALS[module, name]


class MiniImageNet(ClassDataset):
    """mini-ImageNet's 64 / 16 / 20 classes (Ravi & Larochelle), read from JPEGs or pickle caches."""

    name = "miniimagenet"
    machine_local = ("root", "cache_dir")

    def __init__(
        self, root: str, image_size: int = 84, channels: int = 3, cache_dir: str | None = None
    ):
        check_image_size(image_size, 84)
        check_channels(self.name, channels)
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.channels = channels
        self.cache_dir = cache_dir
        self.mean, self.std = colour_stats(MEAN, STD, channels)
        # The 8-pixel padding of the 84-pixel recipes, kept in proportion at other sizes.
        self.standard_augment = {
            "crop_padding": max(1, round(8 * image_size / 84)),
            "flip": True,
            "color_jitter": 0.4,
        }
        # Which layout, and the CSV or pickle each part is read from: checked before anything is written.
        self.kind, self.sources = self._find_sources()
        self._parts: dict[str, ClassImages] = {}

    def _find_sources(self) -> tuple[str, dict[str, Path]]:
        """The layout found under root (images/ first: the JPEGs are the original) and each part's source."""
        if (self.root / "images").is_dir():
            in_root = {part: self.root / f"{part}.csv" for part in self.parts}
            found = [part for part, path in in_root.items() if path.is_file()]
            if found and len(found) < len(self.parts):
                missing = ", ".join(f"{p}.csv" for p in self.parts if p not in found)
                raise MetarunError(
                    f"mini-ImageNet root {self.root} has {', '.join(f'{p}.csv' for p in found)} "
                    f"but not {missing}; put all three CSVs there or none (then the shipped ones are used)"
                )
            if found:
                return "ravi csv+jpeg (CSVs in root)", in_root
            return "ravi csv+jpeg (shipped CSVs)", {
                part: SHIPPED_CSVS / f"{part}.csv" for part in self.parts
            }
        pickles = {
            part: [self.root / f"mini-imagenet-cache-{n}.pkl" for n in names]
            for part, names in PICKLE_NAMES.items()
        }
        if any(path.is_file() for paths in pickles.values() for path in paths):
            sources = {}
            for part, paths in pickles.items():
                if not (present := [path for path in paths if path.is_file()]):
                    raise MetarunError(
                        f"mini-ImageNet pickle {paths[0]} is missing beside the other parts' pickles; "
                        f"put mini-imagenet-cache-{{train,val,test}}.pkl in {self.root}"
                    )
                sources[part] = present[0]
            return "pickle caches", sources
        raise MetarunError(
            f"no mini-ImageNet under {self.root}: put the JPEGs in {self.root / 'images'}/ (Ravi & Larochelle layout, "
            f"CSVs optional) or mini-imagenet-cache-{{train,val,test}}.pkl in {self.root}; set dataset.root "
            "(ImageNet's licence forbids downloading them for you)"
        )

    def part(self, part: str) -> ClassImages:
        self.check_part(part)
        if part not in self._parts:  # decoded on first use: train alone is 0.8 GB at 84x84
            source = self.sources[part]
            if self.kind == "pickle caches":
                files, build = [source], lambda: self._read_pickle(source)
            else:
                names, paths, counts = self._read_csv(source)
                files, build = (
                    [*paths, source],
                    lambda: self._read_jpegs(part, names, paths, counts),
                )
            path = cache_file(
                self.cache_dir,
                self.name,
                self.root,
                part,
                f"{self.image_size}px",
                f"{self.channels}c",
            )
            payload = load_or_build(
                path, source_fingerprint(files, self.kind, self.image_size, self.channels), build
            )
            self._parts[part] = ClassImages(
                payload["images"], payload["counts"], tuple(payload["names"])
            )
        return self._parts[part]

    def layout(self) -> dict[str, str]:
        return {
            "layout": self.kind,
            "root": str(self.root),
            "cache": str(Path(self.cache_dir or default_cache_dir()).expanduser()),
        }

    def _read_csv(self, csv_path: Path) -> tuple[list[str], list[Path], list[int]]:
        """Class names in order of first appearance, their JPEGs class after class (in CSV order
        within a class), and how many each class has."""
        with open(csv_path, newline="") as f:
            rows = [row for row in csv.reader(f) if row]  # a trailing blank line is no image
        if not rows or rows[0] != ["filename", "label"] or any(len(row) != 2 for row in rows[1:]):
            raise MetarunError(
                f"{csv_path} is not a mini-ImageNet split CSV (header filename,label, then one "
                "image per row); replace it with Ravi & Larochelle's or delete it to use the shipped one"
            )
        by_class: dict[str, list[Path]] = {}
        for filename, label in rows[1:]:
            by_class.setdefault(label, []).append(self.root / "images" / filename)
        paths = [path for files in by_class.values() for path in files]
        missing = [(path, "missing") for path in paths if not path.is_file()]
        if missing:
            raise MetarunError(
                f"mini-ImageNet images listed in {csv_path} are missing, {describe_failures(missing)}; "
                f"put the JPEGs named in its filename column in {self.root / 'images'}/"
            )
        return list(by_class), paths, [len(files) for files in by_class.values()]

    def _read_jpegs(
        self, part: str, names: list[str], paths: list[Path], counts: list[int]
    ) -> dict:
        images, failures = read_images(
            paths, self.image_size, self.channels, desc=f"{self.name}/{part}"
        )  # [I, C, S, S]
        if failures:  # never dropped: a class one image short would silently change the benchmark
            raise MetarunError(
                f"cannot read mini-ImageNet images, {describe_failures(failures)}; "
                f"replace them with the original JPEGs in {self.root / 'images'}/"
            )
        return {"images": images, "counts": torch.tensor(counts, dtype=torch.long), "names": names}

    def _read_pickle(self, path: Path) -> dict:
        def malformed(what: str) -> MetarunError:
            return MetarunError(
                f"{path} is not a mini-ImageNet pickle ({what}); it must hold a dict with image_data "
                "(uint8 [N, H, W, 3]) and class_dict ({name: [indices]}), or use the Ravi & Larochelle layout"
            )

        try:
            with open(path, "rb") as f:
                data = ArraysOnlyUnpickler(f, path).load()
        except MetarunError:
            raise
        except Exception as e:  # truncated, not a pickle: one line, not a traceback
            raise malformed(" ".join(f"{type(e).__name__}: {e}".split())[:120]) from None
        if not isinstance(data, dict) or not {"image_data", "class_dict"} <= data.keys():
            raise malformed("no image_data / class_dict keys")
        if not isinstance(data["class_dict"], dict) or not data["class_dict"]:
            raise malformed("class_dict is not a non-empty dict of class name to indices")
        array, classes = data["image_data"], data["class_dict"]
        if (
            not isinstance(array, np.ndarray)
            or array.dtype != np.uint8
            or array.ndim != 4
            or array.shape[-1] != 3
        ):
            raise malformed(
                f"image_data is {type(array).__name__} {getattr(array, 'dtype', '')} "
                f"{tuple(getattr(array, 'shape', ()))}"
            )
        try:
            indices = [np.asarray(index, dtype=np.int64).reshape(-1) for index in classes.values()]
            images = torch.from_numpy(array[np.concatenate(indices)]).permute(
                0, 3, 1, 2
            )  # [I, 3, H, W]
        except Exception as e:
            raise malformed(
                f"class_dict does not index image_data: {' '.join(str(e).split())[:120]}"
            ) from None
        images = to_channels(resize(images, self.image_size), self.channels)  # [I, C, S, S]
        counts = torch.tensor([len(index) for index in indices], dtype=torch.long)
        return {
            "images": images.contiguous(),
            "counts": counts,
            "names": [str(name) for name in classes],
        }
