"""Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness of MAML
(Raghu, Raghu, Bengio & Vinyals, 2020): ANIL, Almost No Inner Loop.

w'_i = w - alpha * grad_w L_support_i(w^T phi_theta(x))     (inner loop: the head w only; the body theta is not adapted)
(theta, w) <- (theta, w) - beta * grad_(theta, w) sum_i L_query_i(w'_i^T phi_theta(x))   (meta-update, by the trainer)

The body phi_theta is the same before and after adaptation, so its support and query features are
computed once per task and the inner loop runs on the linear head alone.
"""

from __future__ import annotations

from torch import Tensor
from torch.func import functional_call

from metarun.algorithms.base import task_loss, task_score
from metarun.algorithms.inner_loop import inner_loop
from metarun.algorithms.maml import MAML
from metarun.algorithms.task_batching import map_tasks
from metarun.data.tasks import TaskBatch
from metarun.models.layers import detached

BODY, HEAD = "backbone.", "head."


def split_params(params: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A Classifier's parameters as (body, head), named as in `backbone` and `head` themselves."""
    body = {name[len(BODY) :]: p for name, p in params.items() if name.startswith(BODY)}
    head = {name[len(HEAD) :]: p for name, p in params.items() if name.startswith(HEAD)}
    return body, head


class ANIL(MAML):
    """ANIL over `Classifier(model, n_way)`: the head adapts in the inner loop, the body only in the
    outer loop.

    inner_lr (alpha), inner_loss, adaptation_steps, eval_adaptation_steps, first_order: as MAML, for the head.
    task_batching: how the head's inner loop is mapped over tasks ("vmap" or "loop"; "auto": vmap
        on CUDA, loop on CPU). The body runs once per batch, outside that map, on `[T, B, C, H, W]`.
    Batch norm: support and query go through the body in separate calls, each task with its own
    statistics, as in MAML.
    """

    def features(self, body: dict[str, Tensor], x: Tensor) -> Tensor:
        """The body's embedding `[..., B, C, H, W] -> [..., B, D]`, one task's statistics per batch norm."""
        return functional_call(self.model.backbone, body, (x,))

    def adapt_head(
        self,
        head: dict[str, Tensor],
        support_features: Tensor,
        support_y: Tensor,
        steps: int,
        first_order: bool,
        loss_scale: float = 1.0,
    ) -> dict[str, Tensor]:
        """The inner loop on the head alone, fed one task's support features `[N*K, D]`."""
        return inner_loop(
            self.model.head,
            head,
            support_features,
            support_y,
            adaptation_steps=steps,
            inner_lr=self.inner_lr,
            first_order=first_order,
            loss_scale=loss_scale,
            inner_loss=self.inner_loss,
        )

    def adapted_params(
        self,
        params: dict[str, Tensor],
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        first_order: bool,
        loss_scale: float = 1.0,
    ) -> dict[str, Tensor]:
        """All of the Classifier's parameters after adapting to one task: the body's are `params`' own."""
        body, head = split_params(params)
        adapted_head = self.adapt_head(
            head, self.features(body, support_x), support_y, steps, first_order, loss_scale
        )
        return {
            **{BODY + name: p for name, p in body.items()},
            **{HEAD + name: p for name, p in adapted_head.items()},
        }

    def head_task_loss(
        self,
        head: dict[str, Tensor],
        support_features: Tensor,  # [N*K, D]
        support_y: Tensor,  # [N*K]
        query_features: Tensor,  # [N*Q, D]
        query_y: Tensor,  # [N*Q]
        steps: int,
        first_order: bool,
        support_metrics: bool,
        loss_scale: float = 1.0,
    ) -> tuple[Tensor, ...]:
        """One task from its features: adapt the head, then query loss and accuracy (and support
        accuracy before and after adaptation if asked)."""
        adapted = self.adapt_head(head, support_features, support_y, steps, first_order, loss_scale)
        query_logits = functional_call(self.model.head, adapted, (query_features,))  # [N*Q, N]
        out = (task_loss(query_logits, query_y), task_score(query_logits, query_y))
        if support_metrics:
            before = functional_call(
                self.model.head, detached(head), (support_features.detach(),)
            )  # [N*K, N]
            after = functional_call(
                self.model.head, detached(adapted), (support_features.detach(),)
            )  # [N*K, N]
            out += (task_score(before, support_y), task_score(after, support_y))
        return out

    def map_tasks(
        self, params: dict[str, Tensor], tasks: TaskBatch, **settings
    ) -> tuple[Tensor, ...]:
        """`head_task_loss` for every task, each output stacked to `[T]`; the body embeds all tasks'
        support sets in one call and all query sets in another (per-task batch-norm statistics)."""
        self.check_n_way(tasks.n_way)
        body, head = split_params(params)
        support_features = self.features(body, tasks.support_x)  # [T, N*K, D]
        query_features = self.features(body, tasks.query_x)  # [T, N*Q, D]
        data = (support_features, tasks.support_y, query_features, tasks.query_y)

        def one_task(head, support_features, support_y, query_features, query_y):
            return self.head_task_loss(
                head, support_features, support_y, query_features, query_y, **settings
            )

        return map_tasks(
            one_task,
            self.task_batching,
            head,
            *data,
            in_dims=(None, 0, 0, 0, 0),
            randomness="different",
        )
