"""Shuffled mini-batches of single images over every class of a part: what supervised pretraining
trains on (`algorithm=pretrain`), as an ordinary classification data loader gives them.

Epoch e visits every image of the part exactly once, in a random order drawn from a generator
seeded by (seed, e) alone; step s is batch s mod S of epoch s div S, with S = ceil(images /
batch_size) steps per epoch (the last batch of an epoch is smaller when batch_size does not divide
the image count). So a batch is a function of the run's seed and the step only: a run resumed at
any step, also mid-epoch, draws the batches an uninterrupted one would. Each image is labelled
with its class's index in the part (0..C-1). The uint8 pixels are gathered on their device, become
float in [0, 1], are augmented per image (the augment group's settings, parameters drawn from the
trainer's generator, whose state checkpoints keep) and normalized, as episodes are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor
from torchvision.transforms.v2.functional import normalize

from metarun.data.contract import ClassImages
from metarun.data.sampler import episode_seed, normalization
from metarun.errors import MetarunError

if TYPE_CHECKING:
    from metarun.data.augment import Augment


@dataclass
class ImageBatch:
    """B images `[B, C, H, W]` and their class labels `[B]` (indices into the part's classes)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


class ImageBatches:
    """The training part's images as epochs of shuffled batches (see the module docstring);
    `share` (rank, world size) gives each of several processes its slice of every batch."""

    def __init__(
        self,
        images: ClassImages,
        batch_size: int,
        seed: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: Augment | None = None,
        share: tuple[int, int] = (0, 1),
    ):
        if batch_size < 1:
            raise MetarunError(
                f"train.batch_size={batch_size} must be positive; set it to 1 or more"
            )
        self.images = images.images  # [I, C, H, W] uint8
        counts = images.counts
        self.labels = torch.repeat_interleave(torch.arange(len(counts)), counts).to(
            self.images.device
        )  # [I]
        self.n_classes = images.n_classes
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = math.ceil(len(self.images) / batch_size)
        self.mean_std = normalization(mean, std)
        self.augment = augment if augment is not None and augment.active else None
        self.rank, self.world_size = share
        self._order: tuple[int, Tensor] | None = None  # (epoch, its permutation), drawn once

    def __len__(self) -> int:
        return len(self.images)

    def order(self, epoch: int) -> Tensor:
        """Epoch `epoch`'s permutation of the images `[I]`, a function of (seed, epoch) only."""
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator("cpu").manual_seed(episode_seed(self.seed, epoch))
            self._order = epoch, torch.randperm(len(self.images), generator=generator)
        return self._order[1]

    def indices(self, step: int) -> Tensor:
        """The images of step `step`'s batch (this process's slice of it) `[B]`."""
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.batch_size
        batch = self.order(epoch)[start : start + self.batch_size]
        return batch[self.rank :: self.world_size].to(self.images.device)

    def batch(self, step: int, generator: torch.Generator) -> ImageBatch:
        """Step `step`'s batch, augmented with parameters drawn from `generator`."""
        chosen = self.indices(step)
        x = self.images[chosen].float().div_(255)  # [B, C, H, W]
        if self.augment is not None:
            x = self.augment(x, generator)
        if self.mean_std is not None:
            x = normalize(x, *self.mean_std, inplace=True)
        return ImageBatch(x, self.labels[chosen])
