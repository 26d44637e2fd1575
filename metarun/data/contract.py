"""The dataset contract: what a class dataset declares so that nothing else needs to know which it is.

A *class dataset* holds, for each part of its split (train / val / test classes), the images of
every class. The trainer, the sampler, the benchmark and `metarun-data` read only what is declared
here. A new dataset is one subclass of `ClassDataset` (and one YAML in `conf/dataset/`):

    name              short name for messages ("miniimagenet/val has 16 classes")
    channels          1 or 3; images come out `[C, image_size, image_size]`
    image_size        side of the square images after decoding
    mean, std         per-channel normalization of images scaled to [0, 1], applied on the device
    machine_local     config keys that may differ when a run resumes elsewhere (root, cache, ...)
    standard_augment  the `augment=standard` settings for this kind of image (metarun.data.augment)
    part(name)        a `ClassImages` of uint8 images, classes of any sizes
    layout()          what was found on disk, for `metarun-data`: "layout", the data folder
                      under its config key ("root" or "path"), and the "cache" folder

`n_classes(part)`, `class_names(part)` and `input_shape` follow from these, and `decode(image)`, one
image file's pixels as the parts hold them (for a user's own images, `metarun.load`): converted to
`channels` and resized like the dataset's own files; a dataset that decodes otherwise (Omniglot
inverts its strokes) overrides it.

A *task dataset* draws its tasks rather than holding images of classes (metarun.data.sinusoid's
regression): a subclass of `TaskDataset` declares `name`, `machine_local`, `input_shape`, the
`score` its tasks are measured by (metarun.score) and `layout()`, and provides
`tasks(part, n_way, k_shot, n_query, config_key, device)`, a `TaskSource`, where a class dataset's
episodes come from an EpisodeSampler; `figures(learner, test_tasks, run_dir)` may draw what the
learner does. The experiment (metarun.experiment) asks which of the two a dataset is with isinstance.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from PIL import Image
from torch import Tensor

from metarun.data.images import decode_image
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.score import Score

PARTS = ("train", "val", "test")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights of R, G, B in grey, as PIL's convert("L")


@dataclass(frozen=True)
class ClassImages:
    """The images of one part, grouped by class and stored flat: class c is the `counts[c]` images
    starting at `offsets[c]`. Classes may hold different numbers of images (a user's folders do)."""

    images: Tensor  # [I, C, H, W] uint8, every class's images one after another
    counts: Tensor  # [n_classes] int64, images per class, on the CPU
    names: tuple[str, ...]  # [n_classes]

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"images must be [I, C, H, W], got shape {tuple(self.images.shape)}")
        if len(self.names) != len(self.counts) or int(self.counts.sum()) != len(self.images):
            raise ValueError(
                f"{len(self.names)} names and counts summing to {int(self.counts.sum())} "
                f"do not describe {len(self.images)} images"
            )

    @classmethod
    def uniform(
        cls, images: Tensor, names: list[str] | tuple[str, ...] | None = None
    ) -> ClassImages:
        """From `[n_classes, M, C, H, W]`: every class holds M images (a view, no copy)."""
        if images.ndim != 5:
            raise ValueError(
                f"images must be [n_classes, M, C, H, W], got shape {tuple(images.shape)}"
            )
        n_classes, per_class = images.shape[:2]
        names = tuple(names) if names is not None else tuple(str(c) for c in range(n_classes))
        return cls(
            images.flatten(0, 1), torch.full((n_classes,), per_class, dtype=torch.long), names
        )

    @classmethod
    def from_classes(cls, per_class: list[Tensor], names: list[str]) -> ClassImages:
        """From one `[n_c, C, H, W]` tensor per class (copied into one tensor)."""
        counts = torch.tensor([len(x) for x in per_class], dtype=torch.long)
        return cls(torch.cat(per_class), counts, tuple(names))

    @property
    def n_classes(self) -> int:
        return len(self.counts)

    @property
    def offsets(self) -> Tensor:
        """`[n_classes]` index of each class's first image."""
        return torch.cumsum(self.counts, 0) - self.counts

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device | str) -> ClassImages:
        return ClassImages(self.images.to(device), self.counts, self.names)

    def class_images(self, c: int) -> Tensor:
        """`[counts[c], C, H, W]`: the images of class c."""
        start = int(self.offsets[c])
        return self.images[start : start + int(self.counts[c])]


class ClassDataset(ABC):
    """Base of every class dataset; see the module docstring for what a subclass declares."""

    name: ClassVar[str]
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    machine_local: ClassVar[tuple[str, ...]] = ("root", "cache_dir", "download")
    standard_augment: dict[str, Any] = {}  # often set per instance: it scales with image_size
    parts: ClassVar[tuple[str, ...]] = PARTS

    @abstractmethod
    def part(self, part: str) -> ClassImages:
        """The uint8 images of `part`'s classes."""

    def layout(self) -> dict[str, str]:
        """What was read from disk, for `metarun-data`: e.g. {"layout": ..., "cache": path}."""
        return {}

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one item: `(channels, image_size, image_size)`."""
        return (self.channels, self.image_size, self.image_size)

    def n_classes(self, part: str) -> int:
        return self.part(part).n_classes

    def class_names(self, part: str) -> list[str]:
        return list(self.part(part).names)

    def decode(self, image: Image.Image) -> Tensor:
        """A PIL image as uint8 `[channels, image_size, image_size]`, as the parts hold images."""
        return torch.from_numpy(
            decode_image(image, self.image_size, self.channels).copy()
        )  # writable, contiguous

    def check_part(self, part: str) -> None:
        if part not in self.parts:
            raise MetarunError(
                f"{self.name} has no part {part!r}; use one of {', '.join(self.parts)}"
            )


class TaskSource(Protocol):
    """The tasks of one part of a task dataset, as an EpisodeSampler gives a class dataset's."""

    def sample(self, meta_batch_size: int, generator: torch.Generator) -> TaskBatch:
        """Training tasks drawn from `generator`, on the device."""

    def episodes(self, seed: int, start: int, count: int) -> TaskBatch:
        """The fixed evaluation tasks start..start+count-1: task i depends on (seed, part, i) only."""


class TaskDataset(ABC):
    """Base of every task dataset; see the module docstring for what a subclass declares."""

    name: ClassVar[str]
    score: ClassVar[Score]
    input_shape: tuple[int, ...]  # one item's, e.g. (1,) for a number
    machine_local: ClassVar[tuple[str, ...]] = ()
    standard_augment: ClassVar[dict[str, Any]] = {}  # nothing to augment
    parts: ClassVar[tuple[str, ...]] = PARTS
    mean = std = None  # no normalization

    @abstractmethod
    def tasks(
        self,
        part: str,
        n_way: int,
        k_shot: int,
        n_query: int,
        config_key: str,
        device: torch.device,
    ) -> TaskSource:
        """`part`'s tasks of that shape; a shape they cannot take is one MetarunError naming
        `config_key` (episode or eval)."""

    @abstractmethod
    def layout(self) -> dict[str, str]:
        """What the tasks are, for `metarun-data`: {"layout": ...}."""

    def n_classes(self, part: str) -> int:
        return 0

    def figures(self, learner: Any, test_tasks: TaskSource, run_dir: Path) -> list[Path]:
        """Figures of the trained learner on the test tasks, written into run_dir; returns their
        paths (none by default)."""
        return []


def check_channels(name: str, channels: int, allowed: tuple[int, ...] = (1, 3)) -> None:
    if channels not in allowed:
        raise MetarunError(
            f"dataset.channels={channels} is not supported by {name}; "
            f"use dataset.channels={' or '.join(map(str, allowed))}"
        )


def check_image_size(image_size: int, example: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise MetarunError(
            f"dataset.image_size={image_size} must be a positive integer; use e.g. {example}"
        )


def colour_stats(
    mean: tuple[float, ...], std: tuple[float, ...], channels: int
) -> tuple[tuple[float, ...], ...]:
    """A dataset's RGB normalization for `channels` channels: as given, or one luma-weighted value."""
    if channels == 3:
        return tuple(mean), tuple(std)
    grey = lambda values: (sum(w * v for w, v in zip(LUMA, values)),)
    return grey(mean), grey(std)


def to_channels(images: Tensor, channels: int) -> Tensor:
    """uint8 `[..., C, H, W]` with C in {1, 3} as `channels` channels: grey repeated, or RGB to grey
    with the LUMA weights."""
    have = images.shape[-3]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:]).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor(LUMA).view(3, 1, 1)
        return (
            (images.float() * weights).sum(-3, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
        )
    raise ValueError(f"cannot turn {have} channels into {channels}")
