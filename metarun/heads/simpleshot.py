"""SimpleShot (Wang, Chao, Weinberger & van der Maaten, 2019, "SimpleShot: Revisiting
Nearest-Neighbor Classification for Few-Shot Learning"), its CL2N variant: centre the features on the
training classes' mean feature, L2-normalize them, then the nearest class mean.

x <- (x - x_bar) / ||x - x_bar||                     (x_bar: the mean embedding of the training images)
logits_n(q) = -||q - c_n||^2                         (c_n: the class mean of the transformed support)

x_bar is a base statistic (metarun.heads.base): computed from the training part once, when a run is
tested, and stored in its best checkpoint.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from metarun.heads.base import Head, at_least_float32, class_means
from metarun.heads.centroid import squared_euclidean


def centre_and_normalize(x: Tensor, mean: Tensor) -> Tensor:
    """CL2N: `[..., D]` minus the mean feature `[D]`, then unit length."""
    return F.normalize(x - mean, dim=-1)


class SimpleShotHead(Head):
    base_statistics = ("mean",)

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        self.check_episode(support, query)
        support, query = at_least_float32(support, query)
        mean = self.base_mean.to(support)
        support, query = centre_and_normalize(support, mean), centre_and_normalize(query, mean)
        return -squared_euclidean(query, class_means(support, support_y, n_way))
