"""Prototypical Networks for Few-shot Learning (Snell, Swersky & Zemel, 2017).

c_n = 1/|S_n| sum_{(x_i, y_i) in S_n} f(x_i)            (prototypes: class means of support embeddings)
p(y = n | x) = softmax_n(-||f(x) - c_n||^2)              (logits: negative squared Euclidean distance)

Options (off by default: the paper's model) for wide embeddings, as MetaOptNet's ProtoNet head
(Lee et al., 2019) has them: the distance divided by the embedding size D (`normalize_distance`) and
multiplied by a scale (`distance_scale`, learned with `learn_scale`). Without them the squared
distances of a 16000-wide ResNet-12 map reach thousands and SGD at lr 0.1 diverges.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import EpisodeClassifier, check_positive
from metarun.algorithms.task_batching import check_task_chunk, chunk_tasks
from metarun.data.tasks import TaskBatch


def prototypes(support_emb: Tensor, support_y: Tensor, n_way: int) -> Tensor:
    """Class means of the support embeddings: `[T, N*K, D], [T, N*K] -> [T, N, D]`."""
    one_hot = F.one_hot(support_y, n_way).to(support_emb.dtype)  # [T, N*K, N]
    sums = one_hot.transpose(1, 2) @ support_emb  # [T, N, D]
    counts = one_hot.sum(dim=1).unsqueeze(-1)  # [T, N, 1]
    return sums / counts


def squared_euclidean(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared distances `[..., M, D], [..., N, D] -> [..., M, N]`.

    Written as the difference, not |a|^2 + |b|^2 - 2ab, which cancels badly in bf16.
    """
    return (a.unsqueeze(-2) - b.unsqueeze(-3)).square().sum(dim=-1)


class ProtoNet(EpisodeClassifier):
    """Prototypical Networks; `model` must embed `[T, B, C, H, W] -> [T, B, D]` per task (Conv4 does).

    `n_way` is taken from each task batch, so a network trained with more ways (the paper trains
    Omniglot 60-way) evaluates on fewer. `distance_scale`, `learn_scale`, `normalize_distance`: see
    the module docstring. task_chunk: episodes per backward pass in training ("auto": one at a time
    on the CPU, where the backbone embeds them one by one anyway; all of them on CUDA), as MAML's;
    with `model.batch_norm=running` the running statistics move once per meta-batch whatever the
    chunks (metarun.models.layers).
    """

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        distance_scale: float = 1.0,
        learn_scale: bool = False,
        normalize_distance: bool = False,
        task_chunk: int | str = "auto",
    ):
        check_positive(
            "distance_scale", distance_scale, "set algorithm.distance_scale=1.0 (the paper's)"
        )
        super().__init__(model, n_way)
        self.task_chunk = check_task_chunk(task_chunk)
        # A plain number unless learned, so the paper's model keeps the parameters (and checkpoints) it had.
        self.distance_scale = (
            nn.Parameter(torch.tensor(float(distance_scale))) if learn_scale else distance_scale
        )
        self.normalize_distance = normalize_distance

    def episode_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> Tensor:
        """Query logits `[T, N*Q, N]`; support and query are embedded in one forward call, so the
        batch-norm statistics are the episode's."""
        n_support = support_x.shape[1]
        emb = self.model(torch.cat([support_x, query_x], dim=1))  # [T, N*K + N*Q, D]
        support_emb, query_emb = emb[:, :n_support], emb[:, n_support:]
        distances = squared_euclidean(
            query_emb, prototypes(support_emb, support_y, n_way)
        )  # [T, N*Q, N]
        if self.normalize_distance:
            distances = distances / emb.shape[-1]
        if (
            self.normalize_distance
            or isinstance(self.distance_scale, nn.Parameter)
            or self.distance_scale != 1.0
        ):
            distances = distances * self.distance_scale
        return -distances

    def task_chunks(self, tasks: TaskBatch) -> list[TaskBatch]:
        return chunk_tasks(tasks, self.task_chunk, "auto")  # "auto" tells the CPU from CUDA
