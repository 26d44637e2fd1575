"""Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks (Finn, Abbeel & Levine, 2017).

theta'_i = theta - alpha * grad_theta L_support_i(f_theta)                      (inner loop, per task)
theta   <- theta - beta * grad_theta sum_i L_query_i(f_theta'_i)               (meta-update, by the trainer)

L_support is the mean cross-entropy over the support set by default; the paper's code differentiates
N times that (`inner_loss="sum_over_k"`), so its alpha takes N times the step (metarun.algorithms.inner_loop).

First-order MAML (`first_order=True`, config `fomaml`) drops the second derivatives by treating
each inner gradient as a constant.

Which parameters adapt (`inner_params`): all (MAML); the head alone (ANIL, Raghu et al., 2020,
metarun.algorithms.anil); the body alone, the head frozen in the inner loop (BOIL, Oh, Yoo, Kim &
Yun, 2021). All of them are meta-learned by the outer loop.

MAML++ (How to train your MAML, Antoniou, Edwards & Storkey, 2019), each fix an option, off by default:
  msl_steps (MSL)        L_i = sum_s v_s(t) L_query_i(theta'_s)  over the inner steps s = 1..S, the
                         importance v(t) going linearly from 1/S each (training step t = 0) to 0.03/S
                         for s < S (at t = msl_steps), after which only the last step's loss counts
                         (`msl_weights`);
  lslr (LSLR)            theta'_{s} = theta'_{s-1} - alpha_{l,s} grad_l: one learned rate per
                         parameter tensor l and step s, initialised to inner_lr;
  per_step_bn (BNWB, BNRS)  batch-norm scale, shift (and running statistics) per inner step, learned
                         by the outer loop only (metarun.models.layers.per_step_batch_norm);
  first_order_until (DA)  first-order meta-gradients for the first that many training steps.
The training step t reaches the learner through `set_progress(t)`, called by the trainer.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

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
from metarun.algorithms.inner_loop import INNER_LOSSES, StepLR, inner_loop, inner_trajectory
from metarun.algorithms.task_batching import (
    check_task_batching,
    check_task_chunk,
    chunk_tasks,
    map_tasks,
)
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.models.layers import (
    Classifier,
    at_inner_step,
    detached,
    no_statistics_update,
    per_step_batch_norm,
)

BODY, HEAD = "backbone.", "head."
INNER_PARAMS = ("all", "head", "body")


def split_params(params: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A Classifier's parameters as (body, head), named as in `backbone` and `head` themselves."""
    body = {name[len(BODY) :]: p for name, p in params.items() if name.startswith(BODY)}
    head = {name[len(HEAD) :]: p for name, p in params.items() if name.startswith(HEAD)}
    return body, head


def msl_weights(steps: int, progress: int, msl_steps: int) -> list[float] | None:
    """MAML++'s importance of each inner step's query loss at training step `progress`, or None
    once `msl_steps` have passed (then only the last step's loss counts).

    Each of the S - 1 first weights starts at 1/S and falls by (1/S) * progress / msl_steps down to
    at least 0.03/S; the last rises by S - 1 times as much, up to 1 - (S - 1) * 0.03/S, so they sum
    to 1 (HowToTrainYourMAMLPytorch, get_per_step_loss_importance_vector). That code counts
    progress in whole epochs of 500 iterations (multi_step_loss_num_epochs=10 on Omniglot), a
    staircase; here it moves every step and meets the staircase at each epoch's start.
    """
    if progress >= msl_steps:
        return None
    decay, floor = progress / msl_steps / steps, 0.03 / steps
    weights = [max(1 / steps - decay, floor) for _ in range(steps - 1)]
    return weights + [min(1 / steps + (steps - 1) * decay, 1 - (steps - 1) * floor)]


def lslr_key(name: str) -> str:
    """The ParameterDict key of parameter `name`'s learned rates (keys cannot hold ".")."""
    return name.replace(".", "-")


def strip_rates(rates: StepLR, prefix: str) -> StepLR:
    """Rates by parameter name with `prefix` taken off the names (a scalar rate as it is)."""
    if isinstance(rates, list):
        return [{name[len(prefix) :]: r for name, r in step.items()} for step in rates]
    return rates


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
    inner_params: "all", "head" (ANIL: the body runs once per set, its features feed the head's inner
        loop) or "body" (BOIL: the head keeps its meta-learned values in the inner loop).
    MAML++'s options (module docstring), each off by default so that MAML's numbers stay its own:
    msl_steps: training steps of the multi-step loss (0: off); lslr: learned rates per parameter
        tensor and inner step (`inner_lrs`, `adaptation_steps` rates each; evaluation steps past
        them use the last); per_step_bn: per-step batch-norm rows for `adaptation_steps` steps,
        which then adapt only in the outer loop (as MAML++'s code, which keeps them out of its inner
        loop; later evaluation steps use the last row); first_order_until: first-order
        meta-gradients while fewer training steps than that are done.
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
        inner_params: str = "all",
        msl_steps: int = 0,
        lslr: bool = False,
        per_step_bn: bool = False,
        first_order_until: int = 0,
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
        if inner_params not in INNER_PARAMS:
            raise MetarunError(
                f"algorithm.inner_params={inner_params!r} is not one of {', '.join(INNER_PARAMS)}; "
                "set all (MAML), head (ANIL) or body (BOIL)"
            )
        check_at_least("msl_steps", msl_steps, 0, "set algorithm.msl_steps=0 (off) or a step count")
        check_at_least(
            "first_order_until", first_order_until, 0, "set algorithm.first_order_until=0 (off)"
        )
        per_step_names = per_step_batch_norm(model, adaptation_steps) if per_step_bn else []
        super().__init__(Classifier(model, n_way), n_way)
        self.inner_lr = inner_lr
        self.inner_loss = inner_loss
        self.adaptation_steps = adaptation_steps
        self.eval_adaptation_steps = eval_adaptation_steps
        self.first_order = first_order
        self.task_batching = check_task_batching(task_batching, model)
        self.task_chunk = check_task_chunk(task_chunk)
        self.inner_params, self.msl_steps, self.first_order_until = (
            inner_params,
            msl_steps,
            first_order_until,
        )
        self.lslr, self.per_step_bn = lslr, per_step_bn
        # The head alone adapts and the body is the same at every step: its features once per set.
        self.body_once = inner_params == "head" and not per_step_bn
        names = [name for name, _ in self.model.named_parameters()]
        chosen = [
            name
            for name in names
            if inner_params == "all" or name.startswith(HEAD if inner_params == "head" else BODY)
        ]
        outer_only = {BODY + name for name in per_step_names}  # per-step batch norm's rows
        chosen = [name for name in chosen if name not in outer_only]
        # None: every parameter adapts (MAML's inner loop exactly as without the option).
        self.adapted_names: list[str] | None = None if chosen == names else chosen
        if lslr:
            self.inner_lrs = nn.ParameterDict(
                {
                    lslr_key(name): nn.Parameter(torch.full((adaptation_steps,), float(inner_lr)))
                    for name in chosen
                }
            )
        self.progress = 0  # meta-training steps done (set_progress)

    def set_progress(self, step: int) -> None:
        """Tell the learner how many meta-training steps are done before the coming one (the
        trainer's step count): the multi-step loss's weights and first_order_until follow it."""
        self.progress = step

    def inner_rates(self, params: dict[str, Tensor]) -> StepLR:
        """The inner step size for adapting `params`: alpha (Meta-SGD learns one per coordinate),
        or with LSLR a list, per inner step, of each adapted parameter's learned rate. Evaluation
        and `adapt` pass detached parameters: the rates are detached too (no graph through them)."""
        if not self.lslr:
            return self.inner_lr
        detach = not any(p.requires_grad for p in params.values())
        rates = {name: self.inner_lrs[lslr_key(name)] for name in self.adapted_names or params}
        if detach:
            rates = detached(rates)
        return [
            {name: r[step] for name, r in rates.items()} for step in range(self.adaptation_steps)
        ]

    def adaptation(
        self,
        params: dict[str, Tensor],
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        first_order: bool,
        loss_scale: float = 1.0,
    ) -> Iterator[dict[str, Tensor]]:
        """All parameters after each inner step (`inner_trajectory`), for the multi-step loss."""
        rates = self.inner_rates(params)
        settings = self.inner_settings(rates, steps, first_order, loss_scale, self.adapted_names)
        return inner_trajectory(self.model, params, support_x, support_y, **settings)

    def inner_settings(
        self,
        rates: StepLR,
        steps: int,
        first_order: bool,
        loss_scale: float,
        adapted_names: Sequence[str] | None = None,
    ) -> dict:
        """The inner loop's keyword arguments (metarun.algorithms.inner_loop) for `steps` steps."""
        return dict(
            adaptation_steps=steps,
            inner_lr=rates,
            first_order=first_order,
            loss_scale=loss_scale,
            inner_loss=self.inner_loss,
            adapted_names=adapted_names,
        )

    def query_logits(self, adapted: dict[str, Tensor], query_x: Tensor, steps: int) -> Tensor:
        """The model's logits `[M, N]` with `adapted` after `steps` inner steps (per-step batch
        norm: the last step's row, as MAML++'s code predicts)."""
        with at_inner_step(self.model, max(steps - 1, 0)):
            return functional_call(self.model, adapted, (query_x,))

    def adapted_params(
        self,
        params: dict[str, Tensor],
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        first_order: bool,
        loss_scale: float = 1.0,
    ) -> dict[str, Tensor]:
        if self.body_once:
            body, head = split_params(params)
            adapted_head = self.adapt_head(
                head, self.features(body, support_x), support_y, steps, first_order, loss_scale
            )
            return {
                **{BODY + name: p for name, p in body.items()},
                **{HEAD + name: p for name, p in adapted_head.items()},
            }
        rates = self.inner_rates(params)
        settings = self.inner_settings(rates, steps, first_order, loss_scale, self.adapted_names)
        return inner_loop(self.model, params, support_x, support_y, **settings)

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
        loss_weights: Sequence[float] | None = None,
    ) -> tuple[Tensor, ...]:
        """One task: adapt on the support set, then the query loss and accuracy (MSE for regression)
        with the adapted parameters (and, if asked, the support's before and after adaptation).
        loss_weights (the multi-step loss): the loss is the query losses after each inner step,
        so weighted and summed; the score is the last step's."""
        if loss_weights is None:
            adapted = self.adapted_params(
                params, support_x, support_y, steps, first_order, loss_scale
            )
            query_logits = self.query_logits(adapted, query_x, steps)  # [N*Q, N]
            loss = task_loss(query_logits, query_y)
        else:
            loss = 0.0
            trajectory = self.adaptation(
                params, support_x, support_y, steps, first_order, loss_scale
            )
            for step, adapted in enumerate(trajectory):
                query_logits = self.query_logits(adapted, query_x, step + 1)  # [N*Q, N]
                loss = loss + loss_weights[step] * task_loss(query_logits, query_y)
        out = (loss, task_score(query_logits, query_y))
        if support_metrics:
            # Detached parameters and uncounted batch statistics: metrics only, no graph, no state.
            with no_statistics_update(self.model):
                with at_inner_step(self.model, 0):
                    before = functional_call(self.model, detached(params), (support_x,))
                after = self.query_logits(detached(adapted), support_x, steps)  # [N*K, N]
            out += (task_score(before, support_y), task_score(after, support_y))
        return out

    # -- the head alone adapting (inner_params=head, ANIL): the body's features once per set --------
    def features(self, body: dict[str, Tensor], x: Tensor) -> Tensor:
        """The body's embedding `[..., B, C, H, W] -> [..., B, D]`, one task's statistics per batch norm."""
        return functional_call(self.model.backbone, body, (x,))

    def head_rates(self, head: dict[str, Tensor]) -> StepLR:
        """`inner_rates` of the head's parameters, named as in `head` itself."""
        return strip_rates(self.inner_rates({HEAD + n: p for n, p in head.items()}), HEAD)

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
        settings = self.inner_settings(self.head_rates(head), steps, first_order, loss_scale)
        return inner_loop(self.model.head, head, support_features, support_y, **settings)

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
        loss_weights: Sequence[float] | None = None,
    ) -> tuple[Tensor, ...]:
        """`task_loss` from one task's features: adapt the head, then query loss and accuracy (and
        support accuracy before and after adaptation if asked)."""
        if loss_weights is None:
            adapted = self.adapt_head(
                head, support_features, support_y, steps, first_order, loss_scale
            )
            query_logits = functional_call(self.model.head, adapted, (query_features,))  # [N*Q, N]
            loss = task_loss(query_logits, query_y)
        else:
            loss = 0.0
            settings = self.inner_settings(self.head_rates(head), steps, first_order, loss_scale)
            trajectory = inner_trajectory(
                self.model.head, head, support_features, support_y, **settings
            )
            for step, adapted in enumerate(trajectory):
                query_logits = functional_call(self.model.head, adapted, (query_features,))
                loss = loss + loss_weights[step] * task_loss(query_logits, query_y)
        out = (loss, task_score(query_logits, query_y))
        if support_metrics:
            before = functional_call(
                self.model.head, detached(head), (support_features.detach(),)
            )  # [N*K, N]
            after = functional_call(
                self.model.head, detached(adapted), (support_features.detach(),)
            )  # [N*K, N]
            out += (task_score(before, support_y), task_score(after, support_y))
        return out

    def map_head_tasks(
        self, params: dict[str, Tensor], tasks: TaskBatch, **settings
    ) -> tuple[Tensor, ...]:
        """`head_task_loss` for every task, each output stacked to `[T]`; the body embeds all tasks'
        support sets in one call and all query sets in another (per-task batch-norm statistics)."""
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

    def map_tasks(
        self, params: dict[str, Tensor], tasks: TaskBatch, **settings
    ) -> tuple[Tensor, ...]:
        """`task_loss` for every task of the batch, each output stacked to `[T]`."""
        self.check_n_way(tasks.n_way)
        params = self.starting_params(params, tasks.n_way)
        if self.body_once:
            return self.map_head_tasks(params, tasks, **settings)
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
        settings = dict(
            steps=self.adaptation_steps,
            first_order=self.first_order or self.progress < self.first_order_until,
            support_metrics=diagnostics,
            loss_scale=loss_scale,
        )
        weights = msl_weights(self.adaptation_steps, self.progress, self.msl_steps)
        if weights is not None:
            settings["loss_weights"] = tuple(weights)
        losses, accs, *support = self.map_tasks(params, tasks, **settings)
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

    def starting_params(self, params: dict[str, Tensor], n_way: int) -> dict[str, Tensor]:
        """The parameters the inner loop starts from on `n_way`-way tasks: `params` themselves
        (UNICORN-MAML copies its one head row to the N ways)."""
        return params

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        start = detached(dict(self.model.named_parameters()))
        with torch.enable_grad():
            adapted = detached(
                self.adapted_params(
                    self.starting_params(start, int(support_y.max()) + 1),
                    support_x,
                    support_y,
                    self.eval_adaptation_steps,
                    first_order=True,
                )
            )

        def predict(query_x: Tensor) -> Tensor:
            return self.query_logits(adapted, query_x, self.eval_adaptation_steps)  # [M, n_way]

        return predict
