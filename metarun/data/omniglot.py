"""Omniglot as a class dataset.

Lake, Salakhutdinov & Tenenbaum (2015), "Human-level concept learning through probabilistic
program induction", Science 350(6266): 1,623 handwritten characters from 50 alphabets, 20 drawings
of each. The few-shot split of Vinyals et al. (2016), "Matching Networks for One Shot Learning",
adds rotations by 90, 180 and 270 degrees as classes of their own (4112 train / 688 val / 1692 test).

All 32,460 PNGs are decoded once into one uint8 tensor `[1623, 20, 1, S, S]` and cached on disk
(metarun.data.cache); the parts (train / val / test) index that tensor. Strokes are 1 on a 0
background after scaling to [0, 1], and no further normalization is applied (mean 0, std 1), as in
the MAML and Prototypical Networks pipelines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metarun.data.cache import cache_file, fingerprint, load_or_build, stats_under
from metarun.data.contract import (
    ClassDataset,
    ClassImages,
    check_channels,
    check_image_size,
    to_channels,
)
from metarun.data.download import download_and_extract
from metarun.errors import MetarunError

IMAGES_PER_CHARACTER = 20
N_CHARACTERS = 1623
FOLDERS = ("images_background", "images_evaluation")  # background first: fixes character order
# Where torchvision's own Omniglot class downloads from, with its md5s.
URL_PREFIX = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
ZIP_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
SPLITS = ("vinyals", "background")
PARTS = ("train", "val", "test", "trainval")
SPLIT_LISTS = Path(__file__).resolve().parent.parent / "splits" / "omniglot-vinyals"
# split="background": every 5th character of each background alphabet (character05, 10, ...) is
# held out for validation, so val has new characters from every alphabet seen in training.
VAL_EVERY = 5


def ensure_image_folders(root: str | Path, download: bool) -> Path:
    """Return `root/omniglot-py`, downloading torchvision's zips into it if a folder is missing."""
    base = Path(root).expanduser() / "omniglot-py"
    for folder in FOLDERS:
        if (base / folder).is_dir():
            continue
        missing = f"Omniglot folder {base / folder} is missing"
        fix = (
            f"set dataset.root to a folder holding omniglot-py/{folder} "
            "(e.g. $METARUN_DATA/omniglot with METARUN_DATA set), or dataset.download=true"
        )
        if not download:
            raise MetarunError(f"{missing}; {fix}")
        download_and_extract(f"{URL_PREFIX}/{folder}.zip", base, ZIP_MD5[folder], missing, fix)
    return base


def list_characters(base: Path) -> tuple[list[str], list[str], list[Path]]:
    """Every character folder under `base` (= root/omniglot-py), background alphabets first.

    Returns parallel lists: names "Alphabet/characterNN", the image folder each comes from, and the
    character folder paths. Sorted, so the order (and the cached tensor) is the same on every machine.
    """
    names, folders, paths = [], [], []
    for folder in FOLDERS:
        for alphabet in sorted(p for p in (base / folder).iterdir() if p.is_dir()):
            for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                names.append(f"{alphabet.name}/{character.name}")
                folders.append(folder)
                paths.append(character)
    return names, folders, paths


def decode_character(path: Path, image_size: int) -> np.ndarray:
    """The 20 drawings of one character, `[20, S, S]` uint8, strokes 255 on background 0."""
    files = sorted(path.glob("*.png"))
    if len(files) != IMAGES_PER_CHARACTER:
        raise MetarunError(
            f"Omniglot character folder {path} holds {len(files)} PNGs, expected {IMAGES_PER_CHARACTER}; "
            "re-extract images_background.zip / images_evaluation.zip into dataset.root/omniglot-py"
        )
    out = np.empty((IMAGES_PER_CHARACTER, image_size, image_size), dtype=np.uint8)  # [20, S, S]
    for i, file in enumerate(files):
        with Image.open(file) as img:
            out[i] = decode_drawing(img, image_size)
    return out


def decode_drawing(img: Image.Image, image_size: int) -> np.ndarray:
    """One drawing as uint8 `[S, S]`, strokes 255 on background 0."""
    # Mode "1" cannot be filtered; as "L" it is 0 (ink) / 255 (paper). PIL's BILINEAR widens its
    # kernel when downscaling, i.e. antialiases, so thin strokes turn grey rather than vanish; it is
    # torchvision's Resize default and twice as fast as LANCZOS here.
    small = np.asarray(img.convert("L").resize((image_size, image_size), Image.Resampling.BILINEAR))
    # Inverted so that strokes are bright (255) and the background is 0: zero padding and zero
    # activations then mean "no ink", as in the MAML and Prototypical Networks pipelines.
    return np.subtract(255, small, dtype=np.uint8)


def decode_omniglot(root: str | Path, image_size: int) -> dict:
    """Decode every PNG under root/omniglot-py: the payload the cache file holds.

    Returns {"images": uint8 [1623, 20, 1, S, S], "names": ["Alphabet/characterNN", ...],
    "folders": ["images_background" | "images_evaluation", ...]}.
    """
    names, folders, paths = list_characters(Path(root) / "omniglot-py")
    images = np.empty((len(paths), IMAGES_PER_CHARACTER, 1, image_size, image_size), dtype=np.uint8)
    for c, path in enumerate(paths):
        images[c, :, 0] = decode_character(path, image_size)
    return {"images": torch.from_numpy(images), "names": names, "folders": folders}


def load_or_decode(root: str | Path, image_size: int, cache_dir: str | Path | None) -> dict:
    """The decoded payload from the shared cache, decoded again when a PNG changed."""
    base = Path(root).expanduser() / "omniglot-py"
    source = fingerprint(
        [stat for folder in FOLDERS for stat in stats_under(base / folder)], image_size
    )
    path = cache_file(cache_dir, "omniglot", root, f"{image_size}px")
    return load_or_build(path, source, lambda: decode_omniglot(root, image_size))


def read_split_list(part: str) -> list[str]:
    """Class names "Alphabet/characterNN/rotDDD" of one part of the Vinyals split."""
    return (SPLIT_LISTS / f"{part}.txt").read_text().split()


class Omniglot(ClassDataset):
    """Omniglot's images grouped by class for each part of a split.

    split="vinyals": the Vinyals et al. (2016) classes listed in metarun/splits/omniglot-vinyals;
        class "Alphabet/characterNN/rotDDD" is that character's 20 drawings rotated by DDD degrees
        counter-clockwise (torch.rot90 over (H, W), as PIL's rotate in the Prototypical Networks
        code). A character's alphabet may live in either image folder.
    split="background": Lake et al.'s own split, plain characters and no rotations. test = the 659
        characters of the 20 evaluation alphabets; val = every 5th character (character05, 10, ...)
        of each of the 30 background alphabets; train = the other background characters.
    """

    name = "omniglot"
    parts = PARTS
    # A small affine, as stroke images allow: flips and strong crops would change the character.
    standard_augment = {"rotate": 10.0, "translate": 0.1, "scale": 0.1}

    def __init__(
        self,
        root: str,
        split: str = "vinyals",
        image_size: int = 28,
        channels: int = 1,
        download: bool = True,
        cache_dir: str | None = None,
    ):
        """`channels=3` repeats the grey image, for models built for colour images."""
        if split not in SPLITS:
            raise MetarunError(
                f"dataset.split={split!r} is not an Omniglot split; use one of {', '.join(SPLITS)}"
            )
        check_image_size(image_size, 28)
        check_channels(self.name, channels)
        ensure_image_folders(root, download)
        payload = load_or_decode(root, image_size, cache_dir)
        self.root, self.cache_dir = Path(root), cache_dir
        self.split = split
        self.image_size = image_size
        self.channels = channels
        self.mean, self.std = (0.0,) * channels, (1.0,) * channels
        self._characters = payload["images"]  # [1623, 20, 1, S, S] uint8
        self._names = list(payload["names"])
        self._folders = list(payload["folders"])
        self._index = {name: i for i, name in enumerate(self._names)}
        self._parts: dict[str, tuple[list[str], torch.Tensor]] = {}

    def images(self, part: str) -> torch.Tensor:
        """uint8 `[n_classes, 20, channels, S, S]`, strokes 255 on background 0."""
        return self._part(part)[1]

    def part(self, part: str) -> ClassImages:
        names, images = self._part(part)
        return ClassImages.uniform(images, names)

    def decode(self, image: Image.Image) -> torch.Tensor:
        """A drawing as the parts hold it: strokes bright on black, in `channels` channels."""
        return to_channels(
            torch.from_numpy(decode_drawing(image, self.image_size))[None], self.channels
        )

    def layout(self) -> dict[str, str]:
        return {
            "layout": f"torchvision's omniglot-py folders, split={self.split}",
            "root": str(self.root),
            "cache": str(
                cache_file(self.cache_dir, self.name, self.root, f"{self.image_size}px").parent
            ),
        }

    def _part(self, part: str) -> tuple[list[str], torch.Tensor]:
        self.check_part(part)
        if part not in self._parts:  # built on first use: train alone is 64 MB at 28x28
            build = self._vinyals_part if self.split == "vinyals" else self._background_part
            names, images = build(part)
            self._parts[part] = names, to_channels(images, self.channels)
        return self._parts[part]

    def _vinyals_part(self, part: str) -> tuple[list[str], torch.Tensor]:
        names = read_split_list(part)
        characters, quarter_turns = [], []
        for name in names:
            character, rotation = name.rsplit("/", 1)
            if character not in self._index:
                raise MetarunError(
                    f"Omniglot class {name} of the vinyals split is not in the decoded images; "
                    "point dataset.root at the complete dataset (both image folders)"
                )
            characters.append(self._index[character])
            quarter_turns.append(int(rotation.removeprefix("rot")) // 90)
        characters_t, turns_t = torch.tensor(characters), torch.tensor(quarter_turns)
        images = self._characters[characters_t]  # [n_classes, 20, 1, S, S]
        # One rot90 per angle rather than per class: four tensor ops for the whole part.
        for k in (1, 2, 3):
            rotate = turns_t == k
            images[rotate] = torch.rot90(images[rotate], k, dims=(-2, -1))
        return names, images

    def _background_part(self, part: str) -> tuple[list[str], torch.Tensor]:
        chosen = [i for i in range(len(self._names)) if self._in_background_part(i, part)]
        return [self._names[i] for i in chosen], self._characters[torch.tensor(chosen)]

    def _in_background_part(self, i: int, part: str) -> bool:
        background = self._folders[i] == "images_background"
        if part == "test":
            return not background
        if part == "trainval":
            return background
        held_out = int(self._names[i].rsplit("character", 1)[1]) % VAL_EVERY == 0
        return background and held_out == (part == "val")
