"""The contract every meta-learning algorithm meets, and the helpers they share."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.score import MSE, of_targets


def check_at_least(key: str, value: float, minimum: float, fix: str | None = None) -> None:
    """MetarunError `algorithm.KEY=VALUE must be at least MINIMUM; FIX` (default fix: MINIMUM or more)."""
    if value < minimum:
        raise MetarunError(
            f"algorithm.{key}={value} must be at least {minimum}; {fix or f'set algorithm.{key}={minimum} or more'}"
        )


def check_positive(key: str, value: float, fix: str | None = None) -> None:
    """MetarunError `algorithm.KEY=VALUE must be positive; FIX` (default fix: any value > 0)."""
    if not value > 0:
        raise MetarunError(
            f"algorithm.{key}={value} must be positive; {fix or f'pass algorithm.{key}=<a value > 0>'}"
        )


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct argmax predictions over the last item dim: `[..., M, N], [..., M] -> [...]`."""
    return (logits.detach().argmax(dim=-1) == labels).float().mean(dim=-1)


# Regression (e.g. dataset=sinusoid): targets are real numbers `[..., M, 1]` instead of class labels
# `[..., M]`; the learners that support it (`regression = True`) train on the mean squared error and
# report it where classification reports accuracy. The targets' dtype tells which, also under vmap.
def task_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for class labels, mean squared error for real-valued targets: a scalar."""
    return (
        F.mse_loss(outputs, targets)
        if targets.is_floating_point()
        else F.cross_entropy(outputs, targets)
    )


def task_score(outputs: Tensor, targets: Tensor) -> Tensor:
    """Accuracy for class labels, mean squared error for real-valued targets, per task: `[...]`."""
    if of_targets(targets) is MSE:
        return (outputs.detach() - targets).square().flatten(-2).mean(dim=-1)
    return accuracy(outputs, targets)


def learner_metrics(
    losses: Tensor, scores: Tensor, support: list[Tensor], tasks: TaskBatch
) -> dict[str, Tensor]:
    """A gradient-based learner's training metrics from its per-task outputs: "loss" and the score
    ("accuracy" or "mse"), and with diagnostics the support set's score before and after adapting
    ("support_acc_before"/"_after", or "support_mse_..." for regression)."""
    score = of_targets(tasks.query_y)
    metrics = {"loss": losses.mean().detach(), score.name: scores.mean()}
    if support:
        short = score.short
        metrics[f"support_{short}_before"], metrics[f"support_{short}_after"] = (
            score.mean() for score in support
        )
    return metrics


class MetaLearner(nn.Module):
    """A backbone `model` wrapped with a meta-learning algorithm for `n_way` classification.

    - `forward(tasks, diagnostics=False, loss_scale=1.0) -> (loss, metrics)`: the meta-training
      loss (scalar, to be backpropagated) and detached 0-dim metrics, at least "loss" and "accuracy"
      ("mse" for regression tasks) (no `.item()`: the caller syncs); with `diagnostics`, also
      metrics that cost extra work (MAML: support accuracy before and after adaptation), which the
      trainer asks for on logging steps only. `loss_scale` is an fp16 gradient scaler's factor:
      learners that differentiate inside `forward` (inner loops) scale those losses by it and
      unscale the gradients, so small inner gradients survive fp16; the others ignore it.
    - `task_chunks(tasks) -> [TaskBatch, ...]`: the meta-batch in the pieces the trainer
      backpropagates one after another, each piece's loss weighted by its share of the tasks, so
      the gradients accumulate to the whole batch's meta-gradient while memory holds one piece's
      graph (so that under DDP gradients can sync once, after the last piece). The whole batch by default;
      a learner whose loss is the mean of independent per-task losses may split it
      (`algorithm.task_chunk`).
    - `evaluate(tasks) -> (loss [T], accuracy [T])`: per-task query loss and accuracy with the
      evaluation settings; safe to call under `torch.no_grad()`.
    - `adapt(support_x [N*K, C, H, W], support_y [N*K])`: a predictor `[M, C, H, W] -> [M, n_way]`
      logits for one task's queries.
    """

    # What is sized for episode.n_way in learners with a fixed output layer ("head"), for
    # check_n_way's message; None: the learner classifies any number of ways (metric learners).
    fixed_for_n_way: str | None = None
    # Whether it also learns regression tasks (real-valued targets, see task_loss).
    regression: bool = False
    # The classifier its predictions come from, as results.json names it (`head`); a learner whose
    # predictions come from embedding the support and the query images also implements
    # `embed_episode`, so that any head (metarun.heads) can test it (`eval.head=NAME`).
    default_head: str = "own"
    embeds: bool = False
    # Where its backbone (the embedding network model.init replaces) is, as a submodule path.
    backbone_prefix: str = "model"
    # What the trainer draws for it: "episodes" (TaskBatch) or "images" (metarun.data.batches).
    trains_on: str = "episodes"
    # Worker threads its chunks run on (metarun.task_workers): algorithm.task_workers as the
    # experiment resolved it; 1, one chunk after another, unless set.
    task_workers: int | str = 1

    def __init__(self, model: nn.Module, n_way: int):
        super().__init__()
        self.model = model
        self.n_way = n_way

    @property
    def backbone(self) -> nn.Module:
        return self.get_submodule(self.backbone_prefix)

    def set_progress(self, step: int) -> None:
        """The trainer's step count before each training step; a learner whose loss follows it
        (MAML++'s multi-step loss and derivative-order annealing) keeps it."""

    def check_n_way(self, n_way: int) -> None:
        """Raise MetarunError if this learner cannot classify `n_way`-way tasks."""
        if self.fixed_for_n_way is not None and n_way != self.n_way:
            raise MetarunError(
                f"{type(self).__name__} was built for {self.n_way}-way tasks (its {self.fixed_for_n_way}) but got "
                f"{n_way}-way tasks; set eval.n_way={self.n_way} (fixed at episode.n_way)"
            )

    def forward(
        self, tasks: TaskBatch, diagnostics: bool = False, loss_scale: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def task_chunks(self, tasks: TaskBatch) -> list[TaskBatch]:
        return [tasks]

    def evaluate(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError

    def embed_episode(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> tuple[Tensor, Tensor]:
        """The embeddings a head classifies, `[T, N*K, D]` and `[T, N*Q, D]`, as this learner's own
        classifier sees them (batch-norm statistics as in its evaluation)."""
        raise NotImplementedError

    def embed(self, x: Tensor) -> Tensor:
        """The backbone's embedding of a batch of images as one task, `[B, C, H, W] -> [B, D]`
        (what base-class statistics are computed from, metarun.heads.base_statistics)."""
        raise NotImplementedError


class JointEmbedding:
    """For the learners whose backbone `model` embeds an episode's support and queries in one call
    (`[T, B, C, H, W] -> [T, B, D]`: batch-norm statistics over the episode in `task` mode)."""

    embeds = True

    def embed_episode(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> tuple[Tensor, Tensor]:
        n_support = support_x.shape[1]
        emb = self.model(torch.cat([support_x, query_x], dim=1))  # [T, N*K + N*Q, D]
        return emb[:, :n_support], emb[:, n_support:]

    def embed(self, x: Tensor) -> Tensor:
        return self.model(x[None])[0]


class ClassifierBody:
    """For the learners over `Classifier(model, n_way)` (MAML, Meta-SGD, ANIL, Reptile): a head
    on the meta-learned body, without an inner loop (Raghu et al., 2020's "NIL" test), support and
    queries embedded in separate calls as these learners see them (each set's own batch-norm
    statistics)."""

    embeds = True
    backbone_prefix = "model.backbone"

    def embed_episode(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> tuple[Tensor, Tensor]:
        body = self.model.backbone
        return body(support_x), body(query_x)

    def embed(self, x: Tensor) -> Tensor:
        return self.model.backbone(x[None])[0]


class EpisodeClassifier(MetaLearner):
    """A learner that scores an episode's queries in one call, `episode_logits(support_x [T, N*K, ...],
    support_y [T, N*K], query_x [T, M, ...], n_way) -> [T, M, N]` (logits, log-probabilities or
    relation scores: argmax is the prediction), with support and queries embedded together
    (batch-norm statistics over the episode, in training and at test alike); `forward`, `evaluate`
    and `adapt` follow from it and from `query_losses`.
    """

    def episode_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> Tensor:
        raise NotImplementedError

    def query_losses(self, logits: Tensor, query_y: Tensor, reduction: str = "none") -> Tensor:
        """Cross-entropy of the logits: per query `[T, M]` ("none") or its mean over the batch
        ("mean", in one fused call: the gradient of training's loss keeps its summation order)."""
        losses = F.cross_entropy(logits.flatten(0, 1), query_y.flatten(), reduction=reduction)
        return losses.view_as(query_y) if reduction == "none" else losses

    def forward(
        self, tasks: TaskBatch, diagnostics: bool = False, loss_scale: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean query loss over the batch's queries."""
        logits = self.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, tasks.n_way)
        loss = self.query_losses(logits, tasks.query_y, reduction="mean")
        return loss, {"loss": loss.detach(), "accuracy": accuracy(logits, tasks.query_y).mean()}

    def evaluate(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        logits = self.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, tasks.n_way)
        return self.query_losses(logits, tasks.query_y).mean(dim=1).detach(), accuracy(
            logits, tasks.query_y
        )

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """A predictor for one task; each call embeds the support set again together with the
        queries, as in training."""
        n_way = int(support_y.max()) + 1

        def predict(query_x: Tensor) -> Tensor:
            return self.episode_logits(support_x[None], support_y[None], query_x[None], n_way)[
                0
            ]  # [M, N]

        return predict
