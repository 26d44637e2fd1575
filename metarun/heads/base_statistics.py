"""The training classes' statistics a head may declare (`Head.base_statistics`), computed once
from the training part with a run's best weights and kept in its best checkpoint.

"mean": the mean embedding of the training images (SimpleShot's x_bar), over `count` of them drawn
without replacement with a generator seeded by `seed` (all of them when `count` is None or larger),
embedded by `MetaLearner.embed` in chunks of `chunk` images, normalized as the run's episodes are.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Optional

import torch
from torch import Tensor
from torchvision.transforms.v2.functional import normalize

from metarun.algorithms.base import MetaLearner
from metarun.data.contract import ClassImages

CHUNK = 500


@torch.no_grad()
def base_statistics(
    learner: MetaLearner,
    train: ClassImages,
    mean_std: Optional[tuple[list[float], list[float]]],
    count: Optional[int],
    seed: int,
    autocast: Optional[AbstractContextManager] = None,
    chunk: int = CHUNK,
) -> dict[str, Tensor]:
    """{"mean": [D] float32 on the CPU} of `learner`'s embeddings of the training images."""
    n_images = len(train.images)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_images, generator=generator)
    chosen = order if count is None else order[:count]
    device = next(learner.parameters()).device
    was_training = learner.training
    learner.eval()
    total, seen = None, 0
    for idx in chosen.split(chunk):
        x = train.images[idx.to(train.images.device)].to(device).float().div_(255)
        if mean_std is not None:
            x = normalize(x, *mean_std, inplace=True)
        with autocast or nullcontext():
            emb = learner.embed(x).double()  # [B, D]
        total = emb.sum(dim=0) if total is None else total + emb.sum(dim=0)
        seen += len(idx)
    learner.train(was_training)
    return {"mean": (total / seen).float().cpu()}
