"""On First-Order Meta-Learning Algorithms (Nichol, Achiam & Schulman, 2018): Reptile.

phi_i  = U^k_{tau_i}(theta)                                (k steps of SGD or Adam on mini-batches of task i)
theta <- theta + epsilon * 1/n sum_i (phi_i - theta)       (outer update; epsilon annealed linearly to 0)

The trainer's `loss.backward(); optimizer.step()` performs the outer update: `forward` returns the
surrogate 0.5 * sum_p ||theta_p - mean_i phi_i,p||^2, whose gradient with respect to theta is
exactly theta - mean_i phi_i, so SGD (momentum 0) with lr epsilon is the update above and
`scheduler=linear` anneals epsilon. Adam on the same gradient is the paper's own suggested variant
("treat phi - theta as a gradient and plug it into Adam").
"""

from __future__ import annotations

import math
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
from metarun.algorithms.inner_loop import INNER_OPTIMIZERS, inner_loop
from metarun.algorithms.task_batching import check_task_batching, map_tasks
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.models.layers import Classifier, detached, no_statistics_update

ADAM_EPS = 1e-8  # TensorFlow's AdamOptimizer default, which the paper's code uses
EVAL_SEED = 0  # evaluation mini-batches come from a fixed generator, so evaluation is deterministic


def reptile_surrogate(theta: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
    """0.5 * sum_p ||theta_p - target_p||^2 with `target` held constant.

    Its gradient with respect to theta is theta - target exactly (backward of 0.5 * x^2 is x), so one
    SGD step of size epsilon moves theta to theta + epsilon * (target - theta).
    """
    return 0.5 * sum((theta[name] - target[name].detach()).square().sum() for name in theta)


def mini_batch_indices(
    n_items: int,
    batch_size: int,
    steps: int,
    n_tasks: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Which support items each inner step uses: `[n_tasks, steps, batch_size]` long indices.

    As the paper's code samples without replacement: each task's items in shuffled passes, cut into
    consecutive mini-batches (a batch may span two passes; one larger than the set repeats items).
    `generator=None` draws from the global torch RNG of `device`.
    """
    passes = math.ceil(steps * batch_size / n_items)
    if generator is not None:
        device = generator.device
    keys = torch.rand(
        n_tasks, passes, n_items, generator=generator, device=device
    )  # [T, passes, N*K]
    order = keys.argsort(dim=-1).flatten(1)  # [T, passes * N*K]: one permutation per pass
    return order[:, : steps * batch_size].unflatten(1, (steps, batch_size))  # [T, steps, B]


class Reptile(ClassifierBody, MetaLearner):
    """Reptile over `Classifier(model, n_way)`; every parameter adapts in the inner loop.

    inner_optimizer ("adam" or "sgd"), inner_lr, adam_beta1, adam_beta2: the inner optimizer (the
        paper: Adam, lr 1e-3, beta1 = 0). Its moments start at zero for every task: the tasks of a
        meta-batch adapt independently and at once, whereas the paper's code ran them one after
        another and kept Adam's moments (and its step count) from task to task.
    adaptation_steps, inner_batch_size: inner steps per task in meta-training, each on a mini-batch
        of that many support items (0: the whole support set at every step).
    eval_adaptation_steps, eval_inner_batch_size: the same for `evaluate` and `adapt`; mini-batches
        at evaluation come from a fixed generator, the same for every task.
    task_batching: as MAML's ("auto": loop on the CPU, vmap on CUDA).
    The inner loop runs first order on detached parameters: Reptile needs no second derivatives.
    transductive: batch norm uses each set's own statistics (the support mini-batch while adapting,
        the query set when predicting): the transductive setting of the paper's main results. False:
        at evaluation each query is scored alone beside the support set (the paper's other numbers).
        With model.batch_norm=running evaluation is inductive either way.
    `forward`'s metrics "loss" and "accuracy" are the query loss and accuracy of the adapted phi;
    the query set plays no part in the update.
    """

    fixed_for_n_way = "head"
    regression = True

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        inner_lr: float = 0.001,
        adaptation_steps: int = 5,
        inner_batch_size: int = 0,
        eval_adaptation_steps: int = 50,
        eval_inner_batch_size: int = 0,
        inner_optimizer: str = "adam",
        adam_beta1: float = 0.0,
        adam_beta2: float = 0.999,
        task_batching: str = "auto",
        transductive: bool = True,
    ):
        check_settings(
            inner_lr=inner_lr,
            adaptation_steps=adaptation_steps,
            inner_batch_size=inner_batch_size,
            eval_adaptation_steps=eval_adaptation_steps,
            eval_inner_batch_size=eval_inner_batch_size,
            inner_optimizer=inner_optimizer,
            adam_beta1=adam_beta1,
            adam_beta2=adam_beta2,
            task_batching=task_batching,
        )
        super().__init__(Classifier(model, n_way), n_way)
        self.inner_lr = inner_lr
        self.adaptation_steps = adaptation_steps
        self.inner_batch_size = inner_batch_size
        self.eval_adaptation_steps = eval_adaptation_steps
        self.eval_inner_batch_size = eval_inner_batch_size
        self.inner_optimizer = inner_optimizer
        self.adam_betas = (adam_beta1, adam_beta2)
        self.task_batching = check_task_batching(task_batching, model)
        self.transductive = transductive

    def adapted_params(
        self,
        theta: dict[str, Tensor],
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        batch_indices: Tensor | None,
        loss_scale: float = 1.0,
    ) -> dict[str, Tensor]:
        """phi for one task: `steps` inner optimizer steps from (detached) theta."""
        return inner_loop(
            self.model,
            theta,
            support_x,
            support_y,
            adaptation_steps=steps,
            inner_lr=self.inner_lr,
            first_order=True,
            loss_scale=loss_scale,
            inner_optimizer=self.inner_optimizer,
            adam_betas=self.adam_betas,
            adam_eps=ADAM_EPS,
            batch_indices=batch_indices,
        )

    def adapt_task(
        self,
        theta: dict[str, Tensor],
        support_x: Tensor,  # [N*K, C, H, W]
        support_y: Tensor,  # [N*K]
        query_x: Tensor,  # [N*Q, C, H, W]
        query_y: Tensor,  # [N*Q]
        batch_indices: Tensor | None,  # [steps, B]
        steps: int,
        support_metrics: bool,
        loss_scale: float = 1.0,
    ) -> tuple:
        """One task: phi, then the query loss and accuracy of phi (and, if asked, support accuracy
        before and after adaptation). Nothing here is differentiable: theta comes in detached."""
        phi = self.adapted_params(theta, support_x, support_y, steps, batch_indices, loss_scale)
        query_logits = self.score_queries(phi, support_x, query_x)  # [N*Q, N]
        out = (phi, task_loss(query_logits, query_y), task_score(query_logits, query_y))
        if support_metrics:
            with no_statistics_update(
                self.model
            ):  # metrics only: the running statistics stay as they were
                before = functional_call(self.model, theta, (support_x,))  # [N*K, N]
                after = functional_call(self.model, phi, (support_x,))  # [N*K, N]
            out += (task_score(before, support_y), task_score(after, support_y))
        return out

    def map_tasks(
        self, theta: dict[str, Tensor], tasks: TaskBatch, batch_indices: Tensor | None, **settings
    ) -> tuple:
        """`adapt_task` for every task: phi as a dict of `[T, ...]` tensors, the other outputs `[T]`."""
        self.check_n_way(tasks.n_way)
        data = (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)

        def one_task(theta, support_x, support_y, query_x, query_y, batch_indices):
            return self.adapt_task(
                theta, support_x, support_y, query_x, query_y, batch_indices, **settings
            )

        in_dims = (None, 0, 0, 0, 0, None if batch_indices is None else 0)
        return map_tasks(one_task, self.task_batching, theta, *data, batch_indices, in_dims=in_dims)

    def batch_indices(
        self,
        n_tasks: int,
        n_items: int,
        batch_size: int,
        steps: int,
        device: torch.device,
        training: bool,
    ) -> Tensor | None:
        """`[T, steps, B]` mini-batch indices, or None for the whole support set at every step.

        Training draws from the global RNG (the trainer checkpoints it); evaluation from a fixed
        generator, one draw shared by every task, so a task's result depends on nothing else.
        """
        if batch_size in (0, n_items):  # a batch of every item is the whole set, whatever its order
            return None
        if training:
            return mini_batch_indices(n_items, batch_size, steps, n_tasks, device=device)
        generator = torch.Generator().manual_seed(EVAL_SEED)
        return (
            mini_batch_indices(n_items, batch_size, steps, 1, generator)
            .to(device)
            .expand(n_tasks, -1, -1)
        )

    def forward(
        self, tasks: TaskBatch, diagnostics: bool = False, loss_scale: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The Reptile surrogate (see the module docstring); `diagnostics` adds support accuracy
        before and after adaptation and update_norm = ||theta - mean_i phi_i||."""
        theta = dict(self.model.named_parameters())
        indices = self.batch_indices(
            len(tasks),
            tasks.support_x.shape[1],
            self.inner_batch_size,
            self.adaptation_steps,
            tasks.support_x.device,
            training=True,
        )
        phi, losses, accs, *support = self.map_tasks(
            detached(theta),
            tasks,
            indices,
            steps=self.adaptation_steps,
            support_metrics=diagnostics,
            loss_scale=loss_scale,
        )
        loss = reptile_surrogate(theta, {name: p.mean(dim=0) for name, p in phi.items()})
        metrics = learner_metrics(losses, accs, support, tasks)
        if diagnostics:
            metrics["update_norm"] = (2 * loss.detach()).sqrt()
        return loss, metrics

    def evaluate(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        # The inner loop takes gradients even when the caller evaluates under torch.no_grad().
        indices = self.batch_indices(
            len(tasks),
            tasks.support_x.shape[1],
            self.eval_inner_batch_size,
            self.eval_adaptation_steps,
            tasks.support_x.device,
            training=False,
        )
        with torch.enable_grad():
            _, losses, accs = self.map_tasks(
                detached(dict(self.model.named_parameters())),
                tasks,
                indices,
                steps=self.eval_adaptation_steps,
                support_metrics=False,
            )
        return losses.detach(), accs

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        indices = self.batch_indices(
            1,
            support_x.shape[0],
            self.eval_inner_batch_size,
            self.eval_adaptation_steps,
            support_x.device,
            training=False,
        )
        with torch.enable_grad():
            phi = detached(
                self.adapted_params(
                    detached(dict(self.model.named_parameters())),
                    support_x,
                    support_y,
                    self.eval_adaptation_steps,
                    None if indices is None else indices[0],
                )
            )

        def predict(query_x: Tensor) -> Tensor:
            return self.score_queries(phi, support_x, query_x)  # [M, n_way]

        return predict

    def score_queries(self, phi: dict[str, Tensor], support_x: Tensor, query_x: Tensor) -> Tensor:
        """Query logits `[M, N]` with the adapted weights. Transductive: the queries in one batch
        (batch-norm statistics of the query set). Not transductive (in evaluation): each query alone
        beside the support set, so its statistics are those of the support set and that query, as in
        the paper's non-transductive results."""
        if self.transductive or self.training:  # the query set plays no part in training's update
            return functional_call(self.model, phi, (query_x,))
        alone = torch.cat(
            [support_x.expand(len(query_x), *support_x.shape), query_x[:, None]], dim=1
        )  # [M, N*K+1, ...]
        return functional_call(self.model, phi, (alone,))[:, -1]  # [M, N]: each query's own batch


def check_settings(**settings) -> None:
    """MetarunError, naming the key and the fix, for a hyperparameter Reptile cannot run with."""
    at_least = {
        "adaptation_steps": 1,
        "eval_adaptation_steps": 0,
        "inner_batch_size": 0,
        "eval_inner_batch_size": 0,
    }
    for key, low in at_least.items():
        check_at_least(key, settings[key], low)
    check_positive("inner_lr", settings["inner_lr"], "e.g. algorithm.inner_lr=0.001")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= settings[key] < 1:
            raise MetarunError(
                f"algorithm.{key}={settings[key]} must be in [0, 1); e.g. algorithm.{key}=0.9"
            )
    if settings["inner_optimizer"] not in INNER_OPTIMIZERS:
        raise MetarunError(
            f"algorithm.inner_optimizer={settings['inner_optimizer']!r} is not one of {', '.join(INNER_OPTIMIZERS)}; "
            f"use adam (the paper's) or sgd"
        )
    check_task_batching(settings["task_batching"])
