"""The contract every head meets: support embeddings and labels plus query embeddings in, query
logits out, for T tasks at once.

    head(support [T, N*K, D], support_y [T, N*K], query [T, N*Q, D], n_way) -> [T, N*Q, N]

The output is logits or log-probabilities (argmax is the prediction; cross-entropy of either is the
query loss). A head is batched over the T tasks on the device: no Python loop per task where the
math allows it, and each task's result is the one it would get alone. What it declares:

- `differentiable`: a gradient reaches the embeddings through it, so an embedding learner can be
  trained through it episodically (`algorithm=protonet head=svm`). A head that is not
  (`logreg`, `finetune`, the transductive ones) fits its own parameters inside `forward` and is a
  test-time head only (`eval.head=...`).
- `transductive`: each query's prediction uses the other queries' embeddings too; `min_query` is
  the fewest queries per task it needs.
- `base_statistics`: the statistics of the training classes it needs (SimpleShot's "mean", the
  training images' mean embedding). They are computed once from the training part when a run's
  test begins, stored in its best checkpoint, and handed over with `set_base_statistics`.

A head takes the embeddings in the dtype they come in and computes in at least float32 (autocast's
bf16 embeddings are promoted); parameters of its own (a learned temperature) are ordinary
`nn.Parameter`s the optimizer trains with the backbone.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from metarun.errors import MetarunError


class Head(nn.Module):
    """Subclasses implement `forward` and set the class attributes below."""

    differentiable: ClassVar[bool] = False
    transductive: ClassVar[bool] = False
    min_query: ClassVar[int] = 1
    base_statistics: ClassVar[tuple[str, ...]] = ()

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The head's config name (conf/head/NAME.yaml): its module's name."""
        return type(self).__module__.rsplit(".", 1)[-1]

    def set_base_statistics(self, statistics: dict[str, Tensor]) -> None:
        """Keep the training classes' statistics this head declared (`base_statistics`)."""
        for key in self.base_statistics:
            self.register_buffer(f"base_{key}", statistics[key], persistent=False)

    def check_episode(self, support: Tensor, query: Tensor) -> None:
        """One line for an episode this head cannot score (too few queries for a transductive
        head, base statistics it was never given)."""
        if query.shape[1] < self.min_query:
            raise MetarunError(
                f"head={self.name} is transductive and needs at least {self.min_query} queries per "
                f"task but got {query.shape[1]}; set eval.n_query so that N*Q >= {self.min_query}, "
                f"or use an inductive head (centroid, cosine, simpleshot, logreg, ridge, svm)"
            )
        for key in self.base_statistics:
            if getattr(self, f"base_{key}", None) is None:
                raise MetarunError(
                    f"head={self.name} needs the training classes' {key} embedding, which it was "
                    f"not given; test it through a run (metarun-eval RUN eval.head={self.name})"
                )


def at_least_float32(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors promoted to float32 if they are in a narrower float type (bf16, fp16)."""
    return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)


def one_hot(labels: Tensor, n_way: int, like: Tensor) -> Tensor:
    """`[T, S] -> [T, S, N]` in `like`'s dtype and device."""
    return nn.functional.one_hot(labels, n_way).to(like.dtype)


def class_means(support: Tensor, support_y: Tensor, n_way: int) -> Tensor:
    """Class means of the support embeddings: `[T, N*K, D], [T, N*K] -> [T, N, D]`."""
    onehot = one_hot(support_y, n_way, support)  # [T, N*K, N]
    sums = onehot.transpose(1, 2) @ support  # [T, N, D]
    counts = onehot.sum(dim=1).unsqueeze(-1)  # [T, N, 1]
    return sums / counts
