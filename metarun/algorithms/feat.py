"""Few-Shot Learning via Embedding Adaptation with Set-to-Set Functions (Ye, Hu, Zhan & Sha, 2020),
FEAT: ProtoNet's prototypes adapted to the task by a Transformer over the set of them.

c'_n = LN(c_n + Dropout(W_o softmax((W_q c)(W_k c)^T / sqrt(D)) W_v c)_n)   (c_n: support class means)
logits_n(q) = -||f(q) - c'_n||^2 / temperature                               (or cos(f(q), c'_n) / temperature)

The contrastive regularizer, in training only: each class's support and query embeddings, the
K+Q of them, are adapted together by the same attention (a set per class), and every one of the
N*(K+Q) embeddings f(x) is classified against the adapted class centres
z_n = mean of class n's adapted embeddings, by -||f(x) - z_n||^2 / temperature2; the loss is

  CE(logits, query_y) + balance * CE(regularizer logits, [support_y, query_y]).

Values and the attention's layout (one head whose width is the embedding's, attention dropout 0.1,
output dropout 0.5, bias-free W_q, W_k, W_v) follow the authors' code, github.com/Sha-Lab/FEAT
(model/models/feat.py, README's training commands). FEAT trains from a pretrained backbone
(`model.init=RUN_DIR`); without one it trains from scratch.

Where this differs from the code: `distance=cosine` normalizes the queries too (the code only the
prototypes: the same predictions, logits scaled by each query's norm); the code trains the
attention at 10x the backbone's learning rate (--lr_mul 10): `algorithm.lr_mul`, 1 by default; `eval.head=NAME` classifies the backbone's embeddings, without the adaptation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import (
    EpisodeClassifier,
    JointEmbedding,
    accuracy,
    check_at_least,
    check_positive,
)
from metarun.algorithms.task_batching import check_task_chunk, chunk_tasks
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.heads.base import at_least_float32, class_means
from metarun.heads.centroid import squared_euclidean
from metarun.heads.cosine import cosine_similarity

DISTANCES = ("euclidean", "cosine")
# W_q, W_k, W_v and W_o are each D x D a head: a flattened ResNet-12 map (D = 16000) would need
# 10^9 of them, so wide embeddings are refused with the fix (a 640-d ResNet-12 needs 1.6 million).
MAX_ATTENTION_PARAMETERS = 50_000_000
__all__ = ["FEAT", "SetAttention", "class_logits"]


class SetAttention(nn.Module):
    """The set-to-set function: one layer of multi-head scaled-dot-product self-attention over a
    set of D-wide embeddings `[T, S, D] -> [T, S, D]`, with a residual connection, dropout and layer
    norm. Each of the `n_heads` heads is D wide (the code's d_k = d_v = D); `mask [T, S, S]` (True:
    may attend) restricts which items each item attends to.
    """

    def __init__(
        self, dim: int, n_heads: int = 1, dropout: float = 0.5, attention_dropout: float = 0.1
    ):
        super().__init__()
        self.dim, self.n_heads = dim, n_heads
        self.w_q = nn.Linear(dim, n_heads * dim, bias=False)
        self.w_k = nn.Linear(dim, n_heads * dim, bias=False)
        self.w_v = nn.Linear(dim, n_heads * dim, bias=False)
        self.w_o = nn.Linear(n_heads * dim, dim)
        # The code's initialisation: variance 2 / (D + d_k) = 1 / D for the projections, Xavier for W_o.
        for w in (self.w_q, self.w_k, self.w_v):
            nn.init.normal_(w.weight, std=math.sqrt(1.0 / dim))
        nn.init.xavier_normal_(self.w_o.weight)
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        T, S, D = x.shape
        heads = lambda w: w(x).view(T, S, self.n_heads, D).transpose(1, 2)  # [T, h, S, D]
        q, k, v = heads(self.w_q), heads(self.w_k), heads(self.w_v)
        # The softmax in float32 at least: bf16 scores from autocast would round the weights coarsely.
        (scores,) = at_least_float32(q @ k.transpose(-1, -2) / math.sqrt(D))  # [T, h, S, S]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        weights = self.attention_dropout(scores.softmax(dim=-1)).to(v.dtype)
        attended = (weights @ v).transpose(1, 2).reshape(T, S, self.n_heads * D)  # [T, S, h*D]
        return self.layer_norm(x + self.dropout(self.w_o(attended)))


def class_logits(x: Tensor, centres: Tensor, distance: str, temperature: float) -> Tensor:
    """`[T, M, D], [T, N, D] -> [T, M, N]`: -||x - c||^2 / temperature or cos(x, c) / temperature,
    in float32 at least."""
    x, centres = at_least_float32(x, centres)
    if distance == "cosine":
        return cosine_similarity(x, centres) / temperature
    return -squared_euclidean(x, centres) / temperature


class FEAT(JointEmbedding, EpisodeClassifier):
    """FEAT over a backbone `model` that embeds `[T, B, C, H, W] -> [T, B, D]` per task and declares
    its width `out_features` (Conv4, ResNet-12 with `model.pool=avg`: the attention is D x D).

    temperature: the logits' divisor (the code: 64 for a pretrained ResNet-12 on mini-ImageNet);
    temperature2, balance: the regularizer's divisor and weight (0: no regularizer);
    distance: "euclidean" (the paper's) or "cosine";
    n_heads, dropout, attention_dropout: the attention's (see SetAttention);
    task_chunk: episodes per backward pass, as ProtoNet's.
    Any n_way: the attention is over the set of prototypes, whatever its size.
    """

    default_head = "adapted_prototypes"

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        temperature: float = 64.0,
        temperature2: float = 64.0,
        balance: float = 0.01,
        distance: str = "euclidean",
        n_heads: int = 1,
        dropout: float = 0.5,
        attention_dropout: float = 0.1,
        lr_mul: float = 1.0,
        task_chunk: int | str = "auto",
    ):
        check_positive("temperature", temperature, "set algorithm.temperature=64 (the code's)")
        check_positive("temperature2", temperature2, "set algorithm.temperature2=64 (the code's)")
        check_at_least(
            "balance", balance, 0, "set algorithm.balance=0.01 (the code's) or 0 for none"
        )
        check_at_least("n_heads", n_heads, 1, "set algorithm.n_heads=1 (the paper's)")
        check_positive("lr_mul", lr_mul, "set algorithm.lr_mul=10 (the code's) or 1")
        if distance not in DISTANCES:
            raise MetarunError(
                f"algorithm.distance={distance!r} is not one of {', '.join(DISTANCES)}; "
                "set algorithm.distance=euclidean (the paper's)"
            )
        for key, rate in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if not 0 <= rate < 1:
                raise MetarunError(
                    f"algorithm.{key}={rate} must be in [0, 1); set 0.5 (dropout) and 0.1 "
                    "(attention_dropout), the code's"
                )
        dim = getattr(model, "out_features", None)
        if not isinstance(dim, int):
            raise MetarunError(
                f"algorithm=feat needs a backbone that declares its embedding width (out_features); "
                f"{type(model).__name__} does not: use model=conv4 or model=resnet12 model.pool=avg"
            )
        if 4 * n_heads * dim * dim > MAX_ATTENTION_PARAMETERS:
            raise MetarunError(
                f"algorithm=feat's attention over {dim}-d embeddings would have "
                f"{4 * n_heads * dim * dim:,} parameters; average the backbone's map "
                "(model=resnet12 model.pool=avg, 640-d as the code's) or narrow it"
            )
        super().__init__(model, n_way)
        self.temperature, self.temperature2, self.balance = temperature, temperature2, balance
        self.distance = distance
        self.attention = SetAttention(dim, n_heads, dropout, attention_dropout)
        self.lr_mul = lr_mul
        self.task_chunk = check_task_chunk(task_chunk)

    def parameter_groups(self, lr: float) -> list[dict]:
        """The optimizer's groups: the backbone at `lr`, the attention at lr_mul times it (the
        code's --lr_mul 10: a pretrained body moves slowly, the new attention fast)."""
        return [
            {"params": list(self.model.parameters())},
            {"params": list(self.attention.parameters()), "lr": lr * self.lr_mul},
        ]

    def adapted_prototypes(self, support_emb: Tensor, support_y: Tensor, n_way: int) -> Tensor:
        """The class means of the support embeddings adapted as one set: `[T, N, D]`."""
        return self.attention(class_means(support_emb, support_y, n_way))

    def episode_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> Tensor:
        """Query logits `[T, N*Q, N]` against the adapted prototypes."""
        support_emb, query_emb = self.embed_episode(support_x, support_y, query_x, n_way)
        prototypes = self.adapted_prototypes(support_emb, support_y, n_way)
        return class_logits(query_emb, prototypes, self.distance, self.temperature)

    def regularizer_logits(self, embeddings: Tensor, labels: Tensor, n_way: int) -> Tensor:
        """The contrastive regularizer's logits `[T, M, N]` of a task's M = N*(K+Q) support and
        query embeddings `[T, M, D]` with their labels `[T, M]`: each class's embeddings adapted as
        one set (attention masked to the same class), their means the centres."""
        same_class = labels[:, :, None] == labels[:, None, :]  # [T, M, M]
        centres = class_means(self.attention(embeddings, same_class), labels, n_way)  # [T, N, D]
        return class_logits(embeddings, centres, self.distance, self.temperature2)

    def forward(
        self, tasks: TaskBatch, diagnostics: bool = False, loss_scale: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean query loss plus `balance` times the regularizer's mean loss."""
        n_way = tasks.n_way
        support_emb, query_emb = self.embed_episode(
            tasks.support_x, tasks.support_y, tasks.query_x, n_way
        )
        prototypes = self.adapted_prototypes(support_emb, tasks.support_y, n_way)
        logits = class_logits(query_emb, prototypes, self.distance, self.temperature)
        query_loss = self.query_losses(logits, tasks.query_y, reduction="mean")
        metrics = {"accuracy": accuracy(logits, tasks.query_y).mean()}
        loss = query_loss
        if self.balance > 0:
            embeddings = torch.cat([support_emb, query_emb], dim=1)  # [T, N*(K+Q), D]
            labels = torch.cat([tasks.support_y, tasks.query_y], dim=1)  # [T, N*(K+Q)]
            regularizer = F.cross_entropy(
                self.regularizer_logits(embeddings, labels, n_way).flatten(0, 1), labels.flatten()
            )
            loss = query_loss + self.balance * regularizer
            metrics.update(query_loss=query_loss.detach(), regularizer=regularizer.detach())
        return loss, {"loss": loss.detach(), **metrics}

    def task_chunks(self, tasks: TaskBatch) -> list[TaskBatch]:
        return chunk_tasks(tasks, self.task_chunk, "auto")  # "auto" tells the CPU from CUDA
