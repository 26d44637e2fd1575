"""Prototypical Networks' classifier (Snell, Swersky & Zemel, 2017): the nearest class mean.

c_n = 1/|S_n| sum_{i in S_n} f(x_i)                  (prototypes: the class means of the support)
logits_n(q) = -scale * ||f(q) - c_n||^2 [/ D]        (negative squared Euclidean distance)

Options for wide embeddings, as MetaOptNet's ProtoNet head (Lee et al., 2019) has them: the distance
divided by the embedding size D (`normalize_distance`) and multiplied by a scale (`distance_scale`,
learned with `learn_scale`). The defaults are the paper's model: scale 1, no division.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metarun.errors import MetarunError
from metarun.heads.base import Head, class_means


def squared_euclidean(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared distances `[..., M, D], [..., N, D] -> [..., M, N]`.

    Written as the difference, not |a|^2 + |b|^2 - 2ab, which cancels badly in bf16.
    """
    return (a.unsqueeze(-2) - b.unsqueeze(-3)).square().sum(dim=-1)


class CentroidHead(Head):
    differentiable = True

    def __init__(
        self,
        distance_scale: float = 1.0,
        learn_scale: bool = False,
        normalize_distance: bool = False,
    ):
        if not distance_scale > 0:
            raise MetarunError(
                f"distance_scale={distance_scale} must be positive; set it to 1.0 (the paper's)"
            )
        super().__init__()
        # A plain number unless learned, so the paper's model has no parameters of its own.
        self.distance_scale = (
            nn.Parameter(torch.tensor(float(distance_scale))) if learn_scale else distance_scale
        )
        self.normalize_distance = normalize_distance

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        distances = squared_euclidean(query, class_means(support, support_y, n_way))  # [T, M, N]
        if self.normalize_distance:
            distances = distances / query.shape[-1]
        if (
            self.normalize_distance
            or isinstance(self.distance_scale, nn.Parameter)
            or self.distance_scale != 1.0
        ):
            distances = distances * self.distance_scale
        return -distances
