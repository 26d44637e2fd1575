"""Meta-Baseline's classifier (Chen, Liu, Xu, Darrell & Wang, 2021, "Meta-Baseline: Exploring
Simple Meta-Learning for Few-Shot Learning"): cosine similarity to the class means, times a learned
temperature.

c_n = 1/|S_n| sum_{i in S_n} f(x_i)
logits_n(q) = tau * cos(f(q), c_n)                   (tau learned, initialised at 10: the paper's Sec. 3.2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.errors import MetarunError
from metarun.heads.base import Head, class_means


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise cosines `[..., M, D], [..., N, D] -> [..., M, N]`."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)


class CosineHead(Head):
    differentiable = True

    def __init__(self, temperature: float = 10.0, learn_temperature: bool = True):
        if not temperature > 0:
            raise MetarunError(
                f"head.temperature={temperature} must be positive; set head.temperature=10 "
                "(Meta-Baseline's initial value)"
            )
        super().__init__()
        value = torch.tensor(float(temperature))
        self.temperature = nn.Parameter(value) if learn_temperature else temperature

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        return self.temperature * cosine_similarity(query, class_means(support, support_y, n_way))
