"""Synthetic embeddings for the head tests: Gaussian class clusters, support and queries."""

from __future__ import annotations

import torch
from torch import Tensor


def clustered(
    n_tasks: int = 4,
    n_way: int = 5,
    k_shot: int = 1,
    n_query: int = 15,
    dim: int = 32,
    spread: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """support [T, N*K, D], support_y [T, N*K], query [T, N*Q, D], query_y [T, N*Q]: each class a
    unit-variance centre plus noise of std `spread`, the items in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_tasks, n_way, dim, generator=g, dtype=dtype)

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(n_way).repeat_interleave(per_class).expand(n_tasks, -1)
        order = torch.rand(n_tasks, n_way * per_class, generator=g).argsort(dim=1)
        labels = labels.gather(1, order)
        noise = spread * torch.randn(n_tasks, n_way * per_class, dim, generator=g, dtype=dtype)
        return centres.gather(1, labels[..., None].expand(-1, -1, dim)) + noise, labels

    support, support_y = draw(k_shot)
    query, query_y = draw(n_query)
    return support, support_y, query, query_y
