"""N-way K-shot episode sampling (Vinyals et al., 2016, "Matching Networks for One Shot Learning").

An episode draws N distinct classes, then K support and Q query images of each class, disjoint,
and relabels the classes 0..N-1 in a random order. All T episodes of a meta-batch are drawn at once
as index tensors on the device that holds the images: one gather, no Python loop per image or task.
Classes may hold different numbers of images; those with fewer than K + Q are left out.

The gathered uint8 pixels become float in [0, 1], are augmented (training episodes, when an
`Augment` is given; evaluation episodes only gain augmented support copies) and normalized with
the dataset's mean and std, all on the images' device.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor
from torchvision.transforms.v2.functional import normalize

from metarun.data.contract import ClassImages
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError

if TYPE_CHECKING:
    from metarun.data.augment import Augment

_SEED_STRIDE = 1_000_003  # a prime: (seed, i) and (seed', i') rarely collide on one generator seed


class EpisodeSampler:
    """Episodes of one part of a class dataset: `images` is a `ClassImages` (classes of any sizes)
    or a uint8 tensor `[n_classes, M, C, H, W]` (M images each)."""

    def __init__(
        self,
        images: ClassImages | Tensor,
        n_way: int,
        k_shot: int,
        n_query: int,
        part: str,
        dataset_name: str = "dataset",
        config_key: str = "episode",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: Augment | None = None,
        support_copies: int = 0,
    ):
        """`config_key` names the config node the episode came from, for error messages. `augment`
        transforms training episodes (its support/query flags say which sets); `support_copies` = M
        adds M augmented copies of each support image to evaluation episodes (needs `augment`)."""
        if isinstance(images, Tensor):
            if images.ndim != 5:
                raise ValueError(
                    f"images must be [C, M, channels, H, W], got shape {tuple(images.shape)}"
                )
            images = ClassImages.uniform(images)
        for key, value in (("n_way", n_way), ("k_shot", k_shot), ("n_query", n_query)):
            if not isinstance(value, int) or value < 1:
                raise MetarunError(
                    f"{config_key}.{key}={value} must be a positive integer; set {config_key}.{key}>=1"
                )
        self.classes = usable_classes(
            images, n_way, k_shot, n_query, f"{dataset_name}/{part}", config_key
        )
        self.images = images.images  # [I, C, H, W] uint8
        self.offsets = images.offsets.to(images.images.device)  # [n_classes]
        self.counts = images.counts  # [n_classes], on the CPU
        self.ragged = bool((self.counts != self.counts[0]).any())
        self.max_count = int(self.counts.max())
        self._on_device: dict[
            torch.device, tuple[Tensor, Tensor]
        ] = {}  # (classes, counts) per generator device
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.part, self.dataset_name = part, dataset_name
        self.mean_std = normalization(mean, std)
        if support_copies and augment is None:
            raise ValueError("support_copies needs an augment")
        self.augment = augment if augment is not None and augment.active else None
        self.support_copies = support_copies

    @property
    def n_classes(self) -> int:
        """Classes that episodes are drawn from (those holding at least k_shot + n_query images)."""
        return len(self.classes)

    def sample(self, meta_batch_size: int, generator: torch.Generator) -> TaskBatch:
        """T = meta_batch_size training episodes drawn from `generator` (ideally on images.device)."""
        if meta_batch_size < 1:
            raise MetarunError(
                f"meta_batch_size={meta_batch_size} must be positive; set it to 1 or more"
            )
        tasks = self._gather(*self._draw(meta_batch_size, generator))
        if self.augment is not None:
            augment = lambda x: self.augment(x.flatten(0, 1), generator).view_as(x)
            if self.augment.support:
                tasks.support_x = augment(tasks.support_x)
            if self.augment.query:
                tasks.query_x = augment(tasks.query_x)
        return self._normalized(tasks)

    def episode(self, seed: int, index: int) -> TaskBatch:
        """Fixed evaluation episode `index`: a function of (seed, index) only, same on every device."""
        return self.episodes(seed, index, 1)

    def episodes(self, seed: int, start: int, count: int) -> TaskBatch:
        """Fixed episodes start..start+count-1 stacked (T = count); equal to stacking `episode`."""
        if count < 1:
            raise MetarunError(
                f"episode count={count} must be positive; ask for 1 or more episodes"
            )
        # One CPU generator per episode, so episode i does not depend on the batch it is drawn in
        # nor on the device; only these small index tensors are drawn per episode.
        generators = [
            torch.Generator("cpu").manual_seed(episode_seed(seed, i))
            for i in range(start, start + count)
        ]
        draws = [self._draw(1, g) for g in generators]
        support, query, classes = zip(*draws)
        stack = lambda parts: tuple(torch.cat(p) for p in zip(*parts))
        tasks = self._gather(stack(support), stack(query), torch.cat(classes))
        if self.support_copies:
            tasks = self._with_support_copies(tasks, generators)
        return self._normalized(tasks)

    def _draw(self, n_tasks: int, generator: torch.Generator):
        """Index tensors for n_tasks episodes: ((image, label) of support, same of query, classes).

        Images are `[T, N*K]` (support) or `[T, N*Q]` (query) indices into `self.images`, on its
        device; classes `[T, N]` is the class behind each label.
        """
        T, N, K, Q = n_tasks, self.n_way, self.k_shot, self.n_query
        device = generator.device
        rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)
        if device not in self._on_device:  # copied once, not at every step
            self._on_device[device] = self.classes.to(device), self.counts.to(device)
        usable, counts = self._on_device[device]
        # argsort of uniform noise = a uniform random permutation; its first N entries are N distinct
        # classes in random order, so label j -> classes[:, j] is also a random assignment.
        classes = usable[rand(T, len(usable)).argsort(dim=1)[:, :N]]  # [T, N]
        noise = rand(T, N, self.max_count)  # [T, N, images of the largest class]
        if self.ragged:
            # Ragged classes: positions past a class's own count sort last, so the first K + Q of
            # the permutation are distinct images of that class.
            noise.masked_fill_(
                torch.arange(self.max_count, device=device) >= counts[classes][..., None], 2.0
            )
        items = noise.argsort(dim=2)[:, :, : K + Q]  # [T, N, K+Q], distinct per class
        images = self.offsets[classes.to(self.offsets.device)][..., None] + items.to(
            self.offsets.device
        )  # [T, N, K+Q]
        labels = torch.arange(N, device=device).expand(T, N)  # [T, N]

        def flat_shuffled(item_slice: slice, per: int):
            n = N * per
            image = images[:, :, item_slice].reshape(T, n)  # [T, N*per]
            lab = labels[:, :, None].expand(T, N, per).reshape(T, n)
            # Shuffled so that no learner can read labels off the position of an item.
            order = rand(T, n).argsort(dim=1)
            return tuple(
                t.gather(1, order.to(t.device)).to(self.images.device) for t in (image, lab)
            )

        return (
            flat_shuffled(slice(0, K), K),
            flat_shuffled(slice(K, K + Q), Q),
            classes.to(self.images.device),
        )

    def _gather(self, support, query, classes) -> TaskBatch:
        """Pixels for the drawn indices: float32 in [0, 1] on images.device."""
        (s_image, s_y), (q_image, q_y) = support, query
        support_x = self.images[s_image].float().div_(255)  # [T, N*K, C, H, W]
        query_x = self.images[q_image].float().div_(255)  # [T, N*Q, C, H, W]
        return TaskBatch(support_x, s_y, query_x, q_y, self.n_way, classes)

    def _with_support_copies(
        self, tasks: TaskBatch, generators: list[torch.Generator]
    ) -> TaskBatch:
        tasks.support_x, tasks.support_y = with_support_copies(
            self.augment, tasks.support_x, tasks.support_y, self.support_copies, generators
        )
        return tasks

    def _normalized(self, tasks: TaskBatch) -> TaskBatch:
        if self.mean_std is not None:
            mean, std = self.mean_std
            tasks.support_x = normalize(tasks.support_x, mean, std, inplace=True)
            tasks.query_x = normalize(tasks.query_x, mean, std, inplace=True)
        return tasks


def with_support_copies(
    augment,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    copies: int,
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each support image followed by M = `copies` augmented copies: `[T, N*K, ...] -> [T, N*K*(1+M), ...]`.
    Episode t's copies are drawn from its own generator, so it still depends on (seed, index) alone."""
    T, n = support_y.shape
    params = [augment.draw(n * copies, g) for g in generators]
    params = {key: torch.cat([p[key] for p in params]) for key in params[0]}
    originals = support_x.repeat_interleave(copies, dim=1).flatten(0, 1)  # [T*N*K*M, C, H, W]
    added = augment.apply(originals, params).unflatten(0, (T, n * copies))  # [T, N*K*M, C, H, W]
    return (
        torch.cat([support_x, added], dim=1),
        torch.cat([support_y, support_y.repeat_interleave(copies, dim=1)], dim=1),
    )


def normalization(mean, std) -> tuple[list[float], list[float]] | None:
    """(mean, std) as torchvision's `normalize` takes them; None where normalizing changes nothing
    (no statistics, or Omniglot's mean 0 and std 1)."""
    if mean is None or (all(m == 0 for m in mean) and all(s == 1 for s in std)):
        return None
    return list(mean), list(std)


def statistics(dataset) -> dict[str, list[float]] | None:
    """The mean and std that `dataset`'s episodes are normalized with, as checkpoints record them:
    a run tested on another dataset normalizes its images as the model learned (metarun.saved_run).
    None for a dataset without them (drawn tasks)."""
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    return (
        None if mean is None else {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    )


def usable_classes(
    images: ClassImages, n_way: int, k_shot: int, n_query: int, where: str, config_key: str
) -> Tensor:
    """Indices of the classes holding at least k_shot + n_query images; those with fewer are named
    in a warning, and too few left for `n_way` is one line naming the fix."""
    counts, per_class = images.counts, k_shot + n_query
    if n_way > images.n_classes:
        raise MetarunError(
            f"{config_key}.n_way={n_way} but {where} has {images.n_classes} classes; "
            f"lower {config_key}.n_way to at most {images.n_classes} or use a split with more classes"
        )
    keep = counts >= per_class
    if not keep.any():
        most = int(counts.max())
        per = (
            f"{most} images per class"
            if bool((counts == most).all())
            else f"at most {most} images in a class"
        )
        raise MetarunError(
            f"{config_key}.k_shot={k_shot} + {config_key}.n_query={n_query} = {per_class} but {where} has {per}; "
            f"lower {config_key}.k_shot or {config_key}.n_query to sum to at most {most}"
        )
    dropped = [images.names[c] for c in (~keep).nonzero().flatten().tolist()]
    need = f"{config_key}.k_shot + {config_key}.n_query = {per_class}"
    if dropped and images.n_classes - len(dropped) < n_way:
        raise MetarunError(
            f"{config_key}.n_way={n_way} but only {int(keep.sum())} of {where}'s {images.n_classes} classes hold "
            f"{need} images; lower {config_key}.n_way, {config_key}.k_shot or {config_key}.n_query"
        )
    if dropped:
        shown = ", ".join(dropped[:5]) + (
            f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
        )
        warnings.warn(
            f"{where}: {len(dropped)} classes hold fewer than {need} images and are left out: {shown}",
            stacklevel=3,
        )
    return keep.nonzero().flatten()  # [usable classes]


def episode_seed(seed: int, index: int) -> int:
    """The generator seed of fixed episode `index`; kept in [0, 2**63) as manual_seed requires."""
    return (seed * _SEED_STRIDE + index) % 2**63
