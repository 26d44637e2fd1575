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
"""

from __future__ import annotations

import functools
from typing import Callable, Collection, Mapping, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metarun.algorithms.base import task_loss
from metarun.vmap import is_vmapped

# A scalar step size for every parameter, or one per adapted parameter name (scalar or a tensor
# of the parameter's shape, e.g. Meta-SGD's learned per-coordinate rates).
InnerLR = Union[float, Tensor, Mapping[str, Union[float, Tensor]]]
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
    *,
    adaptation_steps: int,
    inner_lr: InnerLR,
    first_order: bool = False,
    adapted_names: Collection[str] | None = None,
    loss_scale: float = 1.0,
    inner_optimizer: str = "sgd",
    inner_loss: str = "mean",
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    batch_indices: Tensor | None = None,
) -> dict[str, Tensor]:
    """Adapt `params` to one task's support set by `adaptation_steps` steps of gradient descent.

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
    Returns all parameters, the adapted ones replaced.
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
        grads = support_gradient(loss, fast, create_graph=not first_order, vmapped=vmapped)
        if loss_scale != 1.0:
            grads = {name: g / loss_scale for name, g in grads.items()}
        if inner_optimizer == "sgd":
            fast = sgd_step(fast, grads, inner_lr)
        else:
            fast, moments = adam_step(
                fast, grads, moments, step + 1, inner_lr, adam_betas, adam_eps
            )
    return {**frozen, **fast}


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
