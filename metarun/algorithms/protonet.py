"""Prototypical Networks for Few-shot Learning (Snell, Swersky & Zemel, 2017).

c_n = 1/|S_n| sum_{(x_i, y_i) in S_n} f(x_i)            (prototypes: class means of support embeddings)
p(y = n | x) = softmax_n(-||f(x) - c_n||^2)              (logits: negative squared Euclidean distance)

The classifier is a head (metarun.heads): by default the paper's, `centroid`
(metarun.heads.centroid), with the options MetaOptNet's ProtoNet head (Lee et al., 2019) has for
wide embeddings: the distance divided by the embedding size D (`normalize_distance`) and multiplied
by a scale (`distance_scale`, learned with `learn_scale`). Without them the squared distances of a
16000-wide ResNet-12 map reach thousands and SGD at lr 0.1 diverges. Any differentiable head
trains in its place (`head=svm`: MetaOptNet-SVM, `head=ridge`: MetaOptNet-RR, `head=r2d2`: R2-D2,
`head=cosine`: Meta-Baseline's second stage).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from metarun.algorithms.base import EpisodeClassifier, JointEmbedding, check_positive
from metarun.algorithms.task_batching import check_task_chunk, chunk_tasks
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.heads.base import Head, class_means
from metarun.heads.centroid import CentroidHead, squared_euclidean

prototypes = class_means  # the paper's name for the class means of the support embeddings
__all__ = ["ProtoNet", "prototypes", "squared_euclidean"]


class ProtoNet(JointEmbedding, EpisodeClassifier):
    """Prototypical Networks; `model` must embed `[T, B, C, H, W] -> [T, B, D]` per task (Conv4 does).

    `n_way` is taken from each task batch, so a network trained with more ways (the paper trains
    Omniglot 60-way) evaluates on fewer. `head`: the classifier trained through (a differentiable
    metarun.heads.Head; None: `centroid` with `distance_scale`, `learn_scale` and
    `normalize_distance`, see the module docstring). task_chunk: episodes per backward pass in
    training ("auto": one at a time on the CPU, where the backbone embeds them one by one anyway;
    all of them on CUDA), as MAML's; with `model.batch_norm=running` the running statistics move
    once per meta-batch whatever the chunks (metarun.models.layers).
    """

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        distance_scale: float = 1.0,
        learn_scale: bool = False,
        normalize_distance: bool = False,
        task_chunk: int | str = "auto",
        head: Optional[Head] = None,
    ):
        check_positive(
            "distance_scale", distance_scale, "set algorithm.distance_scale=1.0 (the paper's)"
        )
        if head is not None and not head.differentiable:
            raise MetarunError(
                f"head={head.name} is not differentiable and cannot be trained through; test with "
                f"it instead (eval.head={head.name}), or train with a head that is: centroid, "
                "cosine, ridge, r2d2 or svm"
            )
        super().__init__(model, n_way)
        self.task_chunk = check_task_chunk(task_chunk)
        self.head = head or CentroidHead(distance_scale, learn_scale, normalize_distance)
        self.default_head = self.head.name
        # Checkpoints from before heads kept a learned scale as `distance_scale`.
        self._register_load_state_dict_pre_hook(renamed_distance_scale)

    def episode_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> Tensor:
        """Query logits `[T, N*Q, N]` of the head."""
        support_emb, query_emb = self.embed_episode(support_x, support_y, query_x, n_way)
        return self.head(support_emb, support_y, query_emb, n_way)

    def task_chunks(self, tasks: TaskBatch) -> list[TaskBatch]:
        return chunk_tasks(tasks, self.task_chunk, "auto")  # "auto" tells the CPU from CUDA


def renamed_distance_scale(state: dict[str, Any], prefix: str, *args: Any) -> None:
    old = prefix + "distance_scale"
    if old in state:
        state[prefix + "head.distance_scale"] = state.pop(old)
