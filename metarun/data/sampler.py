"""N-way K-shot episode sampling (Vinyals et al., 2016, "Matching Networks for One Shot Learning").

An episode draws N distinct classes, then K support and Q query images of each class, disjoint,
and relabels the classes 0..N-1 in a random order. All T episodes of a meta-batch are drawn at once
as index tensors on the device that holds the images: one gather, no Python loop per image or task.
"""

from __future__ import annotations

import torch

from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError

_SEED_STRIDE = 1_000_003  # a prime: (seed, i) and (seed', i') rarely collide on one generator seed


class EpisodeSampler:
    """Episodes of one part of a class dataset, `images` uint8 `[C, M, 1, H, W]` (C classes, M each)."""

    def __init__(
        self,
        images: torch.Tensor,
        n_way: int,
        k_shot: int,
        n_query: int,
        part: str,
        dataset_name: str = "omniglot",
        config_key: str = "episode",
    ):
        """`config_key` names the config node the episode came from, for error messages."""
        if images.ndim != 5:
            raise ValueError(f"images must be [C, M, channels, H, W], got shape {tuple(images.shape)}")
        for key, value in (("n_way", n_way), ("k_shot", k_shot), ("n_query", n_query)):
            if not isinstance(value, int) or value < 1:
                raise MetarunError(f"{config_key}.{key}={value} must be a positive integer; set {config_key}.{key}>=1")
        n_classes, per_class = images.shape[:2]
        where = f"{dataset_name}/{part}"
        if n_way > n_classes:
            raise MetarunError(
                f"{config_key}.n_way={n_way} but {where} has {n_classes} classes; "
                f"lower {config_key}.n_way to at most {n_classes} or use a split with more classes"
            )
        if k_shot + n_query > per_class:
            raise MetarunError(
                f"{config_key}.k_shot={k_shot} + {config_key}.n_query={n_query} = {k_shot + n_query} but {where} has "
                f"{per_class} images per class; lower {config_key}.k_shot or {config_key}.n_query to sum to at most {per_class}"
            )
        self.images = images
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.part, self.dataset_name = part, dataset_name

    def sample(self, meta_batch_size: int, generator: torch.Generator) -> TaskBatch:
        """T = meta_batch_size training episodes drawn from `generator` (ideally on images.device)."""
        if meta_batch_size < 1:
            raise MetarunError(f"meta_batch_size={meta_batch_size} must be positive; set it to 1 or more")
        return self._gather(*self._draw(meta_batch_size, generator))

    def episode(self, seed: int, index: int) -> TaskBatch:
        """Fixed evaluation episode `index`: a function of (seed, index) only, same on every device."""
        return self.episodes(seed, index, 1)

    def episodes(self, seed: int, start: int, count: int) -> TaskBatch:
        """Fixed episodes start..start+count-1 stacked (T = count); equal to stacking `episode`."""
        if count < 1:
            raise MetarunError(f"episode count={count} must be positive; ask for 1 or more episodes")
        # One CPU generator per episode, so episode i does not depend on the batch it is drawn in
        # nor on the device; only these small index tensors are drawn per episode.
        generators = [torch.Generator("cpu").manual_seed(episode_seed(seed, i)) for i in range(start, start + count)]
        draws = [self._draw(1, g) for g in generators]
        support, query, classes = zip(*draws)
        stack = lambda parts: tuple(torch.cat(p) for p in zip(*parts))  # noqa: E731
        return self._gather(stack(support), stack(query), torch.cat(classes))

    def _draw(self, n_tasks: int, generator: torch.Generator):
        """Index tensors for n_tasks episodes: ((class, item, label) of support, same of query, classes).

        Each is `[T, N*K]` (support) or `[T, N*Q]` (query), on images.device; classes `[T, N]` is
        the class behind each label.
        """
        T, N, K, Q = n_tasks, self.n_way, self.k_shot, self.n_query
        n_classes, per_class = self.images.shape[:2]
        rand = lambda *shape: torch.rand(*shape, generator=generator, device=generator.device)  # noqa: E731
        # argsort of uniform noise = a uniform random permutation; its first N entries are N distinct
        # classes in random order, so label j -> classes[:, j] is also a random assignment.
        classes = rand(T, n_classes).argsort(dim=1)[:, :N]  # [T, N]
        items = rand(T, N, per_class).argsort(dim=2)[:, :, : K + Q]  # [T, N, K+Q], distinct per class
        labels = torch.arange(N, device=generator.device).expand(T, N)  # [T, N]

        def flat_shuffled(item_slice: slice, per: int):
            n = N * per
            cls = classes[:, :, None].expand(T, N, per).reshape(T, n)  # [T, N*per]
            item = items[:, :, item_slice].reshape(T, n)
            lab = labels[:, :, None].expand(T, N, per).reshape(T, n)
            # Shuffled so that no learner can read labels off the position of an item.
            order = rand(T, n).argsort(dim=1)
            return tuple(t.gather(1, order).to(self.images.device) for t in (cls, item, lab))

        return flat_shuffled(slice(0, K), K), flat_shuffled(slice(K, K + Q), Q), classes.to(self.images.device)

    def _gather(self, support, query, classes) -> TaskBatch:
        """Pixels for the drawn indices: float32 in [0, 1] on images.device."""
        (s_cls, s_item, s_y), (q_cls, q_item, q_y) = support, query
        support_x = self.images[s_cls, s_item].float().div_(255)  # [T, N*K, C, H, W]
        query_x = self.images[q_cls, q_item].float().div_(255)  # [T, N*Q, C, H, W]
        return TaskBatch(support_x, s_y, query_x, q_y, self.n_way, classes)


def episode_seed(seed: int, index: int) -> int:
    """The generator seed of fixed episode `index`; kept in [0, 2**63) as manual_seed requires."""
    return (seed * _SEED_STRIDE + index) % 2**63
