"""Random few-shot batches and learner set-up shared by the algorithms' math tests (no real data)."""

from __future__ import annotations

import torch
from torch import nn

from metarun.data.tasks import TaskBatch


def random_tasks(T=3, n_way=5, k_shot=1, queries=2, image_size=28, dtype=torch.float64, seed=0, shuffled=True,
                 n_classes: int | None = None) -> TaskBatch:
    """T tasks of Gaussian-noise images. `shuffled`: support items in a random order per task, as
    the sampler gives them (else class by class); `n_classes`: also draw `classes` from that many."""
    g = torch.Generator().manual_seed(seed)
    ordered = torch.arange(n_way).repeat_interleave(k_shot)
    support_y = (torch.stack([ordered[torch.randperm(n_way * k_shot, generator=g)] for _ in range(T)])
                 if shuffled else ordered.repeat(T, 1))
    classes = (None if n_classes is None
               else torch.stack([torch.randperm(n_classes, generator=g)[:n_way] for _ in range(T)]))
    return TaskBatch(
        torch.randn(T, n_way * k_shot, 1, image_size, image_size, generator=g).to(dtype),
        support_y,
        torch.randn(T, n_way * queries, 1, image_size, image_size, generator=g).to(dtype),
        torch.arange(n_way).repeat_interleave(queries).repeat(T, 1),
        n_way,
        classes,
    )


def perturb_batch_norm(module: nn.Module, scale: float = 0.3) -> nn.Module:
    """Batch-norm affine parameters moved off their initial 1 and 0 (global torch RNG), so that the
    tests exercise their gradients and updates."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".norm." in name:
                p.add_(scale * torch.randn_like(p))
    return module
