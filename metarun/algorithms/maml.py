"""Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks (Finn, Abbeel & Levine, 2017).

theta'_i = theta - alpha * grad_theta L_support_i(f_theta)                      (inner loop, per task)
theta   <- theta - beta * grad_theta sum_i L_query_i(f_theta'_i)               (meta-update, by the trainer)

L_support is the mean cross-entropy over the support set by default; the paper's code differentiates
N times that (`inner_loss="sum_over_k"`), so its alpha takes N times the step (metarun.algorithms.inner_loop).

First-order MAML (`first_order=True`, config `fomaml`) drops the second derivatives by treating
each inner gradient as a constant.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metarun.algorithms.base import (
    ClassifierBody,
    MetaLearner,
    check_at_least,
    check_positive,
    learner_metrics,
    task_loss,
    task_score,
)
from metarun.algorithms.inner_loop import INNER_LOSSES, InnerLR, inner_loop
from metarun.algorithms.task_batching import (
    check_task_batching,
    check_task_chunk,
    chunk_tasks,
    map_tasks,
)
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.models.layers import Classifier, detached, no_statistics_update


def check_inner_loss(inner_loss: str) -> None:
    if inner_loss not in INNER_LOSSES:
        raise MetarunError(
            f"algorithm.inner_loss={inner_loss!r} is not one of {', '.join(INNER_LOSSES)}; set "
            "algorithm.inner_loss=mean (the support set's mean loss) or sum_over_k (MAML's code)"
        )


class MAML(ClassifierBody, MetaLearner):
    """MAML over `Classifier(model, n_way)`; all its parameters adapt in the inner loop.

    inner_lr (alpha), adaptation_steps: the inner loop in meta-training;
    inner_loss: "mean" (the support set's mean loss) or "sum_over_k" (each item's loss / K, summed:
        N times the mean, the loss of the paper's code), see `inner_loop.support_loss`;
    eval_adaptation_steps: inner steps for `evaluate` and `adapt` (the paper adapts longer at test);
    task_batching: "vmap" maps the per-task computation over the tasks with `torch.func.vmap`,
        "loop" runs the tasks one after another, "auto" picks vmap on CUDA and loop on CPU
        (scripts/bench.py on 2 CPU cores: vmapped Conv4 MAML at 0.3-0.45x the loop's speed and
        1.5-1.6x its memory; both give the same loss and gradients).
    task_chunk: tasks per backward pass in training ("auto": one at a time in a loop, all together
        under vmap; see `task_batching.py`): memory holds one chunk's second-order graphs.
    `forward`'s loss_scale (an fp16 GradScaler's) scales the inner support loss too.
    Batch norm uses each set's own statistics (support while adapting, query when predicting):
    the transductive setting of the paper's code. Every parameter adapts, batch-norm scale and shift
    included; the paper's code has no scale and meta-learns the shift without adapting it.
    """

    fixed_for_n_way = "head"
    regression = True

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        inner_lr: float = 0.4,
        inner_loss: str = "mean",
        adaptation_steps: int = 1,
        eval_adaptation_steps: int = 3,
        first_order: bool = False,
        task_batching: str = "auto",
        task_chunk: int | str = "auto",
    ):
        check_positive("inner_lr", inner_lr, "set algorithm.inner_lr=0.4 (MAML's Omniglot value)")
        check_inner_loss(inner_loss)
        check_at_least("adaptation_steps", adaptation_steps, 1)
        check_at_least(
            "eval_adaptation_steps",
            eval_adaptation_steps,
            0,
            "set algorithm.eval_adaptation_steps=3 or another count of inner steps",
        )
        super().__init__(Classifier(model, n_way), n_way)
        self.inner_lr = inner_lr
        self.inner_loss = inner_loss
        self.adaptation_steps = adaptation_steps
        self.eval_adaptation_steps = eval_adaptation_steps
        self.first_order = first_order
        self.task_batching = check_task_batching(task_batching, model)
        self.task_chunk = check_task_chunk(task_chunk)

    def inner_rates(self, params: dict[str, Tensor]) -> InnerLR:
        """The inner step size for adapting `params`: alpha (Meta-SGD learns one per coordinate)."""
        return self.inner_lr

    def adapted_params(
        self,
        params: dict[str, Tensor],
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        first_order: bool,
        loss_scale: float = 1.0,
    ) -> dict[str, Tensor]:
        return inner_loop(
            self.model,
            params,
            support_x,
            support_y,
            adaptation_steps=steps,
            inner_lr=self.inner_rates(params),
            first_order=first_order,
            loss_scale=loss_scale,
            inner_loss=self.inner_loss,
        )

    def task_loss(
        self,
        params: dict[str, Tensor],
        support_x: Tensor,  # [N*K, C, H, W]
        support_y: Tensor,  # [N*K]
        query_x: Tensor,  # [N*Q, C, H, W]
        query_y: Tensor,  # [N*Q]
        steps: int,
        first_order: bool,
        support_metrics: bool,
        loss_scale: float = 1.0,
    ) -> tuple[Tensor, ...]:
        """One task: adapt on the support set, then the query loss and accuracy (MSE for regression)
        with the adapted parameters (and, if asked, the support's before and after adaptation)."""
        adapted = self.adapted_params(params, support_x, support_y, steps, first_order, loss_scale)
        query_logits = functional_call(self.model, adapted, (query_x,))  # [N*Q, N]
        out = (task_loss(query_logits, query_y), task_score(query_logits, query_y))
        if support_metrics:
            # Detached parameters and uncounted batch statistics: metrics only, no graph, no state.
            with no_statistics_update(self.model):
                before = functional_call(self.model, detached(params), (support_x,))  # [N*K, N]
                after = functional_call(self.model, detached(adapted), (support_x,))  # [N*K, N]
            out += (task_score(before, support_y), task_score(after, support_y))
        return out

    def map_tasks(
        self, params: dict[str, Tensor], tasks: TaskBatch, **settings
    ) -> tuple[Tensor, ...]:
        """`task_loss` for every task of the batch, each output stacked to `[T]`."""
        self.check_n_way(tasks.n_way)
        data = (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)

        def one_task(params, support_x, support_y, query_x, query_y):
            return self.task_loss(params, support_x, support_y, query_x, query_y, **settings)

        return map_tasks(
            one_task,
            self.task_batching,
            params,
            *data,
            in_dims=(None, 0, 0, 0, 0),
            randomness="different",
        )

    def forward(
        self, tasks: TaskBatch, diagnostics: bool = False, loss_scale: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Meta-training loss; `diagnostics` adds support accuracy before and after adaptation (two
        more forward passes per task, about 5% of a step: only on the steps that are logged)."""
        params = dict(self.model.named_parameters())
        losses, accs, *support = self.map_tasks(
            params,
            tasks,
            steps=self.adaptation_steps,
            first_order=self.first_order,
            support_metrics=diagnostics,
            loss_scale=loss_scale,
        )
        return losses.mean(), learner_metrics(losses, accs, support, tasks)

    def task_chunks(self, tasks: TaskBatch) -> list[TaskBatch]:
        return chunk_tasks(tasks, self.task_chunk, self.task_batching)

    def evaluate(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        # The inner loop needs gradients even when the caller evaluates under torch.no_grad();
        # no meta-gradient is wanted, so the parameters are detached and the inner loop first-order.
        with torch.enable_grad():
            losses, accs = self.map_tasks(
                detached(dict(self.model.named_parameters())),
                tasks,
                steps=self.eval_adaptation_steps,
                first_order=True,
                support_metrics=False,
            )
        return losses.detach(), accs

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        with torch.enable_grad():
            adapted = detached(
                self.adapted_params(
                    detached(dict(self.model.named_parameters())),
                    support_x,
                    support_y,
                    self.eval_adaptation_steps,
                    first_order=True,
                )
            )

        def predict(query_x: Tensor) -> Tensor:
            return functional_call(self.model, adapted, (query_x,))  # [M, n_way]

        return predict
