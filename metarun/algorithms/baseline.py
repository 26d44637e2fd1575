"""A Closer Look at Few-shot Classification (Chen, Liu, Kira, Wang & Huang, 2019): Baseline and Baseline++.

Training: backbone f and a classifier over all C training classes, by cross-entropy on ordinary batches:
  Baseline:    logits_c = w_c . f(x) + b_c                       Baseline++:  logits_c = s * cos(f(x), w_c)
Testing: f frozen; a NEW classifier of the same kind over the episode's N classes is fitted to the support
embeddings by SGD (lr 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3, batches of 4, 100 epochs) and
classifies the queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import EpisodeClassifier, JointEmbedding, accuracy, check_positive
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.heads.finetune import FinetuneHead, check_finetune, classifier_logits


def global_labels(labels: Tensor, classes: Tensor) -> Tensor:
    """Episode labels to training-class indices, `[T, M], [T, N] -> [T, M]`: label j of task t is classes[t, j]."""
    return classes.gather(1, labels)


class Baseline(JointEmbedding, EpisodeClassifier):
    """Baseline (`cosine=False`) and Baseline++ (`cosine=True`) over a backbone `model` (`[B, C, H, W] -> [B, D]`).

    Training: the trainer gives episodes; support and query images of all T tasks are flattened into one
    labelled batch, each label mapped to its training class through `TaskBatch.classes`, and classified
    over all `n_train_classes` (given by the trainer). So batches are drawn as episodes: N*T classes,
    classes without replacement within a task and K+Q images of each, which is close to, but not the same
    as, the paper's shuffled epochs over all training images (`episode.n_way=8 episode.k_shot=1
    episode.n_query=1 episode.meta_batch_size=1` is a batch of 16 images of 8 classes). The batch is
    embedded in one call, so batch norm uses the statistics of the whole batch, as in ordinary training.
    metrics["accuracy"] is the all-class classifier's accuracy on that batch.

    Evaluation (`evaluate`, `adapt`): each episode's support and query images are embedded by the frozen
    backbone in one call per task. With `model.batch_norm=running` (the experiment configs) batch norm
    uses the running statistics of training, so each image is embedded on its own and a query's
    prediction depends only on the support set and itself: the paper's protocol (its code extracts the
    test features in `model.eval()`, save_features.py). With `model.batch_norm=task` it uses the
    episode's statistics, support and queries together (transductive, as ProtoNet's default). A new
    head, linear or cosine with scale `finetune_scale`, is fitted to the support embeddings
    (`finetune_heads`) and classifies the queries. Any eval n_way works: the training head is not used
    at test time.

    scale: s of the training cosine classifier (Baseline++ only; the authors' code uses 10 for more than
        200 classes, as Omniglot's 4112, and 2 otherwise);
    finetune_scale: s of the new cosine head (Baseline++ only; 2 in the authors' code for N <= 200);
    finetune_epochs: passes over the support set; finetune_batch_size: support items per SGD step (the
        last batch of a pass is smaller when it does not divide N*K; a value >= N*K is full-batch gradient
        descent); finetune_lr, finetune_momentum, finetune_dampening, finetune_weight_decay: the SGD
        optimizer of the new head. Defaults are the paper's code (methods/baselinefinetune.py).

    The authors' code also gives each class vector of the cosine classifier a learnable norm
    (WeightNorm, their issue #4); this follows the paper's formula, a pure cosine times s.
    """

    default_head = "finetune"

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        n_train_classes: int,
        cosine: bool = False,
        scale: float = 10.0,
        finetune_scale: float = 2.0,
        finetune_epochs: int = 100,
        finetune_lr: float = 0.01,
        finetune_batch_size: int = 4,
        finetune_momentum: float = 0.9,
        finetune_dampening: float = 0.9,
        finetune_weight_decay: float = 0.001,
    ):
        if n_train_classes < 1:
            raise MetarunError(
                f"n_train_classes={n_train_classes}: Baseline needs the training split's class count; "
                f"the trainer passes it, pass it yourself when building Baseline directly"
            )
        check_positive("scale", scale)
        check_finetune(
            finetune_scale,
            finetune_epochs,
            finetune_lr,
            finetune_batch_size,
            finetune_momentum,
            finetune_dampening,
            finetune_weight_decay,
            prefix="algorithm.finetune_",
        )
        super().__init__(model, n_way)
        self.n_train_classes = n_train_classes
        self.cosine = cosine
        self.scale = scale
        # The test-time head (metarun.heads.finetune), with the algorithm's fine-tuning settings.
        self.finetune = FinetuneHead(
            cosine,
            finetune_scale,
            finetune_epochs,
            finetune_lr,
            finetune_batch_size,
            finetune_momentum,
            finetune_dampening,
            finetune_weight_decay,
        )
        # The classifier over all training classes; the cosine one has no bias. Zero bias as in the
        # authors' code.
        self.head = nn.Linear(model.out_features, n_train_classes, bias=not cosine)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    def forward(
        self, tasks: TaskBatch, diagnostics: bool = False, loss_scale: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if tasks.classes is None:
            raise MetarunError(
                "Baseline trains on the classes behind each episode label but the task batch has no classes; "
                "build the TaskBatch with classes [T, N] (EpisodeSampler does)"
            )
        x = torch.cat([tasks.support_x, tasks.query_x], dim=1).flatten(
            0, 1
        )  # [T*(N*K + N*Q), C, H, W]
        y = torch.cat(
            [
                global_labels(tasks.support_y, tasks.classes),
                global_labels(tasks.query_y, tasks.classes),
            ],
            dim=1,
        ).flatten()  # [T*(N*K + N*Q)]
        logits = classifier_logits(
            self.model(x), self.head.weight, self.head.bias, self.cosine, self.scale
        )  # [B, C]
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "accuracy": accuracy(logits, y)}

    def embed_episode(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> tuple[Tensor, Tensor]:
        """The frozen backbone's embeddings, support and queries in one call; no graph, no
        gradient reaches the backbone."""
        with torch.no_grad():
            return super().embed_episode(support_x, support_y, query_x, n_way)

    def embed(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return super().embed(x)

    def episode_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> Tensor:
        """Query logits `[T, N*Q, N]` of heads fine-tuned on the support sets, backbone frozen."""
        support_emb, query_emb = self.embed_episode(support_x, support_y, query_x, n_way)
        return self.finetune(support_emb, support_y, query_emb, n_way)
