"""The functional inner loop shared by gradient-based meta-learners (MAML, first-order MAML,
Meta-SGD, ANIL and Reptile).

theta'_0 = theta;  theta'_{s+1} = theta'_s - alpha * grad_theta' L_support(theta'_s)   (s < adaptation_steps)

Built on `torch.func` (`functional_call`, and `grad` under vmap), so it runs for one task or under
`torch.func.vmap` over the tasks of a batch, and the adapted parameters stay differentiable with
respect to `params` (second order) unless `first_order=True`, which detaches each inner gradient.

Options (Reptile's inner loop, Nichol et al., 2018): `inner_optimizer="adam"` replaces the plain
gradient step by Adam (Kingma & Ba, 2015) with fresh moments for every call, and `batch_indices`
makes each step use a mini-batch of the support set instead of all of it. The update rules are
pure functions on dicts of tensors (no torch.optim), so they work under vmap and stay differentiable.

L_support is the mean loss over the support set (`inner_loss="mean"`) or, as MAML's code has it,
each item's loss divided by K and summed (`"sum_over_k"`, N times the mean: `support_loss`).

MAML++ (Antoniou, Edwards & Storkey, 2019) needs the parameters after every step, not only the last
(its multi-step loss): `inner_trajectory` yields them, and `inner_loop` is its last element. Step s's
rate may be its own (`inner_lr` a list: LSLR's learned per-layer, per-step rates), and the step is
told to the module's per-step batch norms (`metarun.models.layers.at_inner_step`).
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, Collection, Iterator, Mapping, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metarun.algorithms.base import task_loss
from metarun.models.layers import at_inner_step
from metarun.vmap import is_vmapped

# A scalar step size for every parameter, or one per adapted parameter name (scalar or a tensor
# of the parameter's shape, e.g. Meta-SGD's learned per-coordinate rates).
InnerLR = Union[float, Tensor, Mapping[str, Union[float, Tensor]]]
# Or a list of those, one per inner step (LSLR); steps past its end take the last.
StepLR = Union[InnerLR, Sequence[InnerLR]]
INNER_OPTIMIZERS = ("sgd", "adam")
INNER_LOSSES = ("mean", "sum_over_k")


def support_loss(outputs: Tensor, targets: Tensor, inner_loss: str = "mean") -> Tensor:
    """The loss the inner loop differentiates, for one task's `outputs [M, N]` and `targets`.

    mean: `task_loss`, the mean over the M items.
    sum_over_k: each item's loss divided by K and summed over the N*K items, as MAML's code
        (cbfinn/maml, utils.xent: softmax cross-entropy / update_batch_size, summed by tf.gradients):
        N times the mean, so an inner step N times as large at the same inner_lr. With one output
        (regression) it is the mean, as that code's mse.
    """
    loss = task_loss(outputs, targets)
    return loss * outputs.shape[-1] if inner_loss == "sum_over_k" else loss


def inner_loop(
    module: nn.Module,
    params: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    **settings,
) -> dict[str, Tensor]:
    """Adapt `params` to one task's support set by `adaptation_steps` steps of gradient descent:
    the last parameters of `inner_trajectory` (with the same arguments), `params` for 0 steps."""
    # Only the last step's parameters are kept (the earlier ones live on in its graph, if any).
    last = collections.deque(inner_trajectory(module, params, support_x, support_y, **settings), 1)
    if last:
        return last[0]
    # No step: the parameters as the loop's own bookkeeping returns them, the adapted ones last.
    names = settings.get("adapted_names")
    names = list(params) if names is None else list(names)
    return {
        **{name: p for name, p in params.items() if name not in names},
        **{name: params[name] for name in names},
    }


def inner_trajectory(
    module: nn.Module,
    params: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    *,
    adaptation_steps: int,
    inner_lr: StepLR,
    first_order: bool = False,
    adapted_names: Collection[str] | None = None,
    loss_scale: float = 1.0,
    inner_optimizer: str = "sgd",
    inner_loss: str = "mean",
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    batch_indices: Tensor | None = None,
) -> Iterator[dict[str, Tensor]]:
    """The parameters after each of `adaptation_steps` steps of gradient descent on one task's
    support set (nothing for 0 steps).

    module: called as `functional_call(module, params, (support_x,))` -> logits `[N*K, n_way]`.
    params: every parameter the module needs (names as in `module.named_parameters()`).
    support_x `[N*K, C, H, W]`, support_y `[N*K]`: one task (the vmapped dim is invisible here).
    adapted_names: the parameters that adapt (default: all); the others pass through unchanged
        (ANIL adapts only the head).
    loss_scale: the support loss is multiplied by it before differentiation and the gradient is
        divided by it before use, so an fp16 GradScaler's scale protects inner gradients from
        underflow too (as PyTorch's AMP notes do for gradient penalties).
    inner_optimizer: "sgd" (the step above) or "adam": `adam_step` with `adam_betas`, `adam_eps`,
        step size `inner_lr`, and moments that start at zero for this task.
    inner_loss: "mean" or "sum_over_k", the support loss (`support_loss`).
    batch_indices `[adaptation_steps, B]` (long): step s computes the support loss on the items
        `batch_indices[s]` only (Reptile's inner mini-batches); default: every item at every step.
    inner_lr: an InnerLR for every step, or a list of them, step s taking `inner_lr[s]` (the last
        past its end). Step s's support pass runs `at_inner_step(module, s)`.
    Yields all parameters, the adapted ones replaced, after each step.
    """
    if inner_optimizer not in INNER_OPTIMIZERS:
        raise ValueError(
            f"inner_optimizer={inner_optimizer!r} is not one of {', '.join(INNER_OPTIMIZERS)}"
        )
    if inner_loss not in INNER_LOSSES:
        raise ValueError(f"inner_loss={inner_loss!r} is not one of {', '.join(INNER_LOSSES)}")
    if batch_indices is not None and batch_indices.shape[0] != adaptation_steps:
        raise ValueError(
            f"batch_indices has {batch_indices.shape[0]} rows for {adaptation_steps} adaptation steps; "
            "give one per step"
        )
    names = list(params) if adapted_names is None else list(adapted_names)
    fast = {name: params[name] for name in names}
    frozen = {name: p for name, p in params.items() if name not in fast}

    def scaled_support_loss(fast: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(module, {**frozen, **fast}, (x,))  # [N*K or B, n_way]
        return support_loss(logits, y, inner_loss) * loss_scale

    vmapped = is_vmapped(support_x)
    # Fresh moments for every task: the tasks of a batch adapt independently (under vmap at once).
    moments = adam_init(fast) if inner_optimizer == "adam" else None
    for step in range(adaptation_steps):
        if batch_indices is None:
            x, y = support_x, support_y
        else:
            x, y = (
                support_x[batch_indices[step]],
                support_y[batch_indices[step]],
            )  # [B, C, H, W], [B]
        loss = functools.partial(scaled_support_loss, x=x, y=y)
        with at_inner_step(module, step):
            grads = support_gradient(loss, fast, create_graph=not first_order, vmapped=vmapped)
        if loss_scale != 1.0:
            grads = {name: g / loss_scale for name, g in grads.items()}
        rate = step_rate(inner_lr, step)
        if inner_optimizer == "sgd":
            fast = sgd_step(fast, grads, rate)
        else:
            fast, moments = adam_step(fast, grads, moments, step + 1, rate, adam_betas, adam_eps)
        yield {**frozen, **fast}


def step_rate(inner_lr: StepLR, step: int) -> InnerLR:
    """Inner step `step`'s rate: `inner_lr` itself, or its entry for the step (the last past its end)."""
    if isinstance(inner_lr, (list, tuple)):
        return inner_lr[min(step, len(inner_lr) - 1)]
    return inner_lr


def sgd_step(
    fast: dict[str, Tensor], grads: dict[str, Tensor], inner_lr: InnerLR
) -> dict[str, Tensor]:
    """w <- w - alpha * g for every parameter."""
    return {name: w - step_size(inner_lr, name) * grads[name] for name, w in fast.items()}


def adam_init(fast: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Adam's first and second moments (m, v), zero for every parameter."""
    return {name: (torch.zeros_like(w), torch.zeros_like(w)) for name, w in fast.items()}


def adam_step(
    fast: dict[str, Tensor],
    grads: dict[str, Tensor],
    moments: dict[str, tuple[Tensor, Tensor]],
    step: int,
    inner_lr: InnerLR,
    betas: tuple[float, float],
    eps: float,
) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """One Adam step (Kingma & Ba, 2015); `step` counts from 1. Returns the parameters and moments.

    m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
    w <- w - alpha * (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)

    Second order through it is exact except where a gradient coordinate is exactly 0: the
    derivative of sqrt at v = 0 is infinite, and the meta-gradient there is NaN.
    """
    beta1, beta2 = betas
    new_fast, new_moments = {}, {}
    for name, w in fast.items():
        g = grads[name]
        m, v = moments[name]
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**step)
        v_hat = v / (1 - beta2**step)
        new_fast[name] = w - step_size(inner_lr, name) * m_hat / (v_hat.sqrt() + eps)
        new_moments[name] = (m, v)
    return new_fast, new_moments


def support_gradient(
    loss: Callable[[dict[str, Tensor]], Tensor],
    fast: dict[str, Tensor],
    *,
    create_graph: bool,
    vmapped: bool,
) -> dict[str, Tensor]:
    """d loss(fast) / d fast, differentiable in turn when `create_graph` (second order).

    Under vmap only `torch.func.grad` can take a per-task gradient. For one task at a time,
    `torch.autograd.grad` gives the same numbers (the tests hold the two together) with a graph that
    the meta-backward differentiates faster: through `torch.func.grad` the per-task loop ran at
    0.9x the speed of a plain `autograd.grad` loop (scripts/bench.py, CPU).
    """
    if vmapped:
        grads = torch.func.grad(loss)(fast)
        return grads if create_graph else {name: g.detach() for name, g in grads.items()}
    # Adapting takes gradients even under torch.no_grad() (as torch.func.grad does), and evaluation
    # adapts detached parameters: give them a gradient to take.
    with torch.enable_grad():
        leaves = {
            name: w if w.requires_grad else w.detach().requires_grad_() for name, w in fast.items()
        }
        grads = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=create_graph)
    return dict(zip(leaves, grads))


def step_size(inner_lr: InnerLR, name: str) -> float | Tensor:
    """The inner learning rate for parameter `name`."""
    return inner_lr[name] if isinstance(inner_lr, Mapping) else inner_lr
