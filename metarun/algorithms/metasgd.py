"""Meta-SGD: Learning to Learn Quickly for Few-Shot Learning (Li, Zhou, Chen & Li, 2017).

theta'_i = theta - alpha o grad_theta L_support_i(f_theta)       (inner loop; alpha: theta's shape, o: elementwise)
(theta, alpha) <- (theta, alpha) - beta * grad_(theta, alpha) sum_i L_query_i(f_theta'_i)  (meta-update, by the trainer)

MAML with a learned inner learning rate per parameter coordinate: alpha sets both the size and the
direction of the inner step and is meta-trained with the initialization theta, through the same
second-order meta-gradient (with `first_order=True` alpha still learns: d theta'/d alpha = -grad).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metarun.algorithms.maml import MAML
from metarun.errors import MetarunError


def rate_key(name: str) -> str:
    """The ParameterDict key of parameter `name`'s rates: keys cannot hold ".", and "-" cannot
    appear in a module attribute name, so the mapping is one-to-one."""
    return name.replace(".", "-")


def init_inner_lrs(
    params: dict[str, Tensor], inner_lr_min: float, inner_lr_max: float
) -> nn.ParameterDict:
    """One rate tensor per parameter, of its shape, uniform in [inner_lr_min, inner_lr_max] (the
    paper: [0.005, 0.1]); constant, drawing nothing from the RNG, when the two are equal."""
    rates = nn.ParameterDict()
    for name, p in params.items():
        if inner_lr_min == inner_lr_max:
            alpha = torch.full_like(p, inner_lr_min)
        else:
            alpha = torch.empty_like(p).uniform_(inner_lr_min, inner_lr_max)
        rates[rate_key(name)] = nn.Parameter(alpha.detach())
    return rates


class MetaSGD(MAML):
    """Meta-SGD over `Classifier(model, n_way)`: every parameter adapts with its own learned rates.

    inner_lr_min, inner_lr_max: alpha's initial range, uniform per coordinate (equal: constant, so
        inner_lr_min = inner_lr_max = a starts as MAML with inner_lr = a). MAML's `inner_lr` is
        gone: the rates are parameters (`inner_lrs`, keys as `rate_key`) that the trainer's
        optimizer updates with the initialization.
    adaptation_steps, eval_adaptation_steps: inner steps in meta-training and at test (the paper
        adapts in one step, both times).
    inner_loss, first_order, task_batching, task_chunk, batch norm (support and query each with their
        own statistics): as MAML.
    """

    fixed_for_n_way = "head (with its learned rates)"

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        inner_lr_min: float = 0.005,
        inner_lr_max: float = 0.1,
        inner_loss: str = "mean",
        adaptation_steps: int = 1,
        eval_adaptation_steps: int = 1,
        first_order: bool = False,
        task_batching: str = "auto",
        task_chunk: int | str = "auto",
    ):
        if not 0 <= inner_lr_min <= inner_lr_max or inner_lr_max <= 0:
            raise MetarunError(
                f"algorithm.inner_lr_min={inner_lr_min} and algorithm.inner_lr_max={inner_lr_max} are not a range "
                f"of initial rates; set 0 <= inner_lr_min <= inner_lr_max with inner_lr_max > 0 (paper: 0.005, 0.1)"
            )
        super().__init__(
            model,
            n_way,
            inner_loss=inner_loss,
            adaptation_steps=adaptation_steps,
            eval_adaptation_steps=eval_adaptation_steps,
            first_order=first_order,
            task_batching=task_batching,
            task_chunk=task_chunk,
        )
        del self.inner_lr  # MAML's scalar; the learned rates below replace it
        self.inner_lrs = init_inner_lrs(
            dict(self.model.named_parameters()), inner_lr_min, inner_lr_max
        )

    def inner_rates(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """alpha by parameter name of `self.model`, as `inner_loop` takes it. Evaluation and `adapt`
        pass detached parameters: no meta-gradient is wanted, so the rates are detached too and no
        graph is kept through them."""
        detach = not any(p.requires_grad for p in params.values())
        return {
            name: self.inner_lrs[rate_key(name)].detach()
            if detach
            else self.inner_lrs[rate_key(name)]
            for name, _ in self.model.named_parameters()
        }
