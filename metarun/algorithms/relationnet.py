"""Learning to Compare: Relation Network for Few-Shot Learning (Sung, Yang, Zhang, Xiang, Torr &
Hospedales, 2018).

c_n = sum_{(x_i, y_i) in S, y_i = n} f(x_i)              (class feature map: the K support maps summed)
r_{j,n} = g(C(c_n, f(x_j))) in [0, 1]                    (relation score: g on the channel-concatenated maps)
L = mean_{j,n} (r_{j,n} - 1[y_j = n])^2                  (MSE against one-hot targets, per task)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import EpisodeClassifier, JointEmbedding, check_at_least
from metarun.errors import MetarunError
from metarun.models.layers import TaskBatchNorm


def class_feature_maps(support_maps: Tensor, support_y: Tensor, n_way: int) -> Tensor:
    """Element-wise sum of each class's support feature maps: `[T, N*K, C, h, w], [T, N*K] -> [T, N, C, h, w]`."""
    one_hot = F.one_hot(support_y, n_way).to(support_maps.dtype)  # [T, N*K, N]
    sums = one_hot.transpose(1, 2) @ support_maps.flatten(2)  # [T, N, C*h*w]
    return sums.unflatten(2, support_maps.shape[2:])  # [T, N, C, h, w]


def relation_loss(scores: Tensor, query_y: Tensor, reduction: str = "none") -> Tensor:
    """Mean squared error of the relation scores `[T, M, N]` against one-hot targets: per query
    `[T, M]` ("none") or over the batch ("mean", the mean of the tasks' means).

    Computed in at least float32, so a bf16 autocast does not round the small squared errors.
    """
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    targets = F.one_hot(query_y, scores.shape[-1]).to(scores.dtype)  # [T, M, N]
    squared = (scores - targets).square()
    return squared.mean(dim=-1) if reduction == "none" else squared.mean(dim=(1, 2)).mean()


class RelationModule(nn.Module):
    """g: two [3x3 conv, per-task batch norm, ReLU, 2x2 max-pool] blocks on the 2C-channel
    concatenation of a class map and a query map, then FC -> ReLU -> FC -> sigmoid.

    A block pools only while its map is at least 2x2, so any map size works (Conv4's default 64x1x1
    as well as the paper's 64x5x5 or our 64x7x7); the first FC's input size follows from the shape.
    Batch norm takes the statistics of all relation pairs of one task, in the backbone's mode.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        channels: int = 64,
        hidden: int = 8,
        batch_norm: str = "task",
    ):
        super().__init__()
        in_channels, height, width = in_shape
        self.in_channels = in_channels
        # No conv biases: the batch-norm mean subtraction cancels them (as in Conv4).
        self.conv1 = nn.Conv2d(2 * in_channels, channels, kernel_size=3, padding=1, bias=False)
        self.norm1 = TaskBatchNorm(channels, batch_norm)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = TaskBatchNorm(channels, batch_norm)
        pools = []
        for _ in range(2):
            pools.append(min(height, width) >= 2)
            if pools[-1]:
                height, width = height // 2, width // 2
        self.pools = tuple(pools)
        self.fc1 = nn.Linear(channels * height * width, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, class_maps: Tensor, query_maps: Tensor) -> Tensor:
        """Relation scores of every (query, class) pair of each task:
        `[T, N, C, h, w], [T, M, C, h, w] -> [T, M, N]`."""
        if class_maps.device.type == "cpu" and class_maps.shape[0] > 1:
            # One task at a time on the CPU, as Conv4 does: 10% faster than batching the tasks'
            # batch norms (4 tasks of 5-way 19-query episodes, 7x7 maps), and evaluation then holds
            # one task's N*Q*N pairs at a time (20-way 15-query, 7x7: 75 MB per activation, not
            # 3.8 GB for a batch of 50 episodes).
            return torch.stack(
                [self.batched_scores(c[None], q[None])[0] for c, q in zip(class_maps, query_maps)]
            )
        return self.batched_scores(class_maps, query_maps)

    def batched_scores(self, class_maps: Tensor, query_maps: Tensor) -> Tensor:
        """`forward` for all tasks in one call: the tasks' pairs side by side, normalized per task."""
        n_tasks, n_way = class_maps.shape[:2]
        n_query = query_maps.shape[1]
        # conv1 on the concatenation C(c_n, f(x_j)) is conv1's class half on c_n plus its query half
        # on f(x_j) (convolution is linear, zero padding pads each half alike): N + M convolutions
        # instead of N * M, and the [T, M, N, 2C, h, w] pair tensor is never built.
        w_class, w_query = self.conv1.weight.split(self.in_channels, dim=1)
        from_class = F.conv2d(class_maps.flatten(0, 1), w_class, padding=1).unflatten(
            0, (n_tasks, n_way)
        )
        from_query = F.conv2d(query_maps.flatten(0, 1), w_query, padding=1).unflatten(
            0, (n_tasks, n_query)
        )
        h = (from_query.unsqueeze(2) + from_class.unsqueeze(1)).flatten(
            0, 2
        )  # [T*M*N, channels, h, w]
        h = self.norm_relu_pool(h, self.norm1, n_tasks, self.pools[0])
        h = self.norm_relu_pool(self.conv2(h), self.norm2, n_tasks, self.pools[1])
        scores = torch.sigmoid(self.fc2(F.relu(self.fc1(h.flatten(1)))))  # [T*M*N, 1]
        return scores.view(n_tasks, n_query, n_way)

    @staticmethod
    def norm_relu_pool(h: Tensor, norm: TaskBatchNorm, n_tasks: int, pool: bool) -> Tensor:
        h = F.relu(norm(h, n_tasks))
        return F.max_pool2d(h, 2) if pool else h


class RelationNet(JointEmbedding, EpisodeClassifier):
    """Relation Networks; `model` must embed `[T, B, C, H, W] -> [T, B, D]` per task and name its
    feature map's shape in `out_shape` (Conv4 does; `model.pool_layers=2` is the paper's embedding).

    relation_channels: filters of the relation module's two convs (64 in the paper);
    relation_hidden: size of its hidden FC layer (8 in the paper).
    Support and query are embedded in one forward call, so the embedding's batch-norm statistics
    are the episode's (the paper's code embeds them in two calls). `n_way` is taken from each task
    batch: the relation module scores one (query, class) pair at a time, for any number of classes.
    """

    default_head = "relation"

    def __init__(
        self, model: nn.Module, n_way: int, relation_channels: int = 64, relation_hidden: int = 8
    ):
        for key, value in (
            ("relation_channels", relation_channels),
            ("relation_hidden", relation_hidden),
        ):
            check_at_least(key, value, 1)
        out_shape = getattr(model, "out_shape", None)
        if out_shape is None or len(out_shape) != 3:
            raise MetarunError(
                f"RelationNet needs the backbone's feature map shape, but {type(model).__name__} has no "
                f"out_shape (channels, height, width); use a backbone that keeps a spatial map and declares "
                f"it: model=conv4 or model=resnet12"
            )
        super().__init__(model, n_way)
        self.out_shape = tuple(out_shape)
        # Its batch norms in the backbone's mode: a running-mode backbone makes the whole learner inductive.
        self.relation = RelationModule(
            self.out_shape, relation_channels, relation_hidden, getattr(model, "batch_norm", "task")
        )

    def episode_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> Tensor:
        """Relation scores `[T, N*Q, N]` of every query with every class of its task."""
        support_emb, query_emb = self.embed_episode(support_x, support_y, query_x, n_way)
        class_maps = class_feature_maps(
            support_emb.unflatten(-1, self.out_shape), support_y, n_way
        )  # [T, N, C, h, w]
        return self.relation(class_maps, query_emb.unflatten(-1, self.out_shape))  # [T, N*Q, N]

    def query_losses(self, logits: Tensor, query_y: Tensor, reduction: str = "none") -> Tensor:
        """The relation scores' squared error against one-hot targets (`relation_loss`)."""
        return relation_loss(logits, query_y, reduction)
