"""Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need? (Tian, Wang,
Krishnan, Tenenbaum & Isola, 2020): RFS's test-time classifier.

x <- x / ||x||                                                   (support and query, `normalize`)
W, b = argmin  C sum_i CE(W x_i + b, y_i) + 1/2 ||W||_F^2        (multinomial, b not penalized)
logits(x) = W x + b

This is scikit-learn's LogisticRegression(C=1) as RFS calls it, fitted here for all T tasks at
once by Newton's method with a backtracking (Armijo) line search (`fit_logistic_regression`).
Newton, not L-BFGS: the objective is smooth and strictly convex, so damped Newton converges from
any start, quadratically at the end, in about ten steps to the dtype's precision, and each task
takes its own step, its own step size and its own stopping test, so its result is exactly the
one it gets alone. torch.optim.LBFGS on the summed objective would share one line search and one
stopping test among the tasks, making a task's result depend on the others in its batch.

The Newton system is small because the fit happens in the span of the task's support
embeddings: the penalty's gradient is W and the loss's a combination of the x_i, so at the
optimum the rows of W lie in that span. With an orthonormal basis V [D, r] of it (r = min(D, N*K),
a QR of X^T), W = W' V^T and ||W|| = ||W'||: the same problem in r features, N*(r+1) unknowns
whatever D is (130 for 5-way 5-shot; a step costs O((N*(r+1))^3) a task, seconds for 50 tasks of
20-way 5-shot on a CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.errors import MetarunError
from metarun.heads.base import Head, at_least_float32, one_hot

# Step sizes 1, 1/2, ..., 2^-29 are tried at once; Armijo's sufficient-decrease constant.
LINE_SEARCH_STEPS = 30
ARMIJO = 1e-4
ROUNDING_SLACK = 10  # in units of the objective's last digit (eps * |objective|)


def logistic_objective(
    theta: Tensor, features: Tensor, targets: Tensor, C: float
) -> tuple[Tensor, Tensor]:
    """C * sum_i CE + 1/2 ||W||^2 for `theta = [W | b]` of shape `[..., N, r+1]`, `features
    [..., S, r+1]` (a last column of ones), one-hot `targets [..., S, N]`; returns the objective
    `[...]` and the class probabilities `[..., S, N]`."""
    logits = features @ theta.transpose(-1, -2)  # [..., S, N]
    log_p = logits.log_softmax(dim=-1)
    loss = -(targets * log_p).sum(dim=(-1, -2))
    penalty = 0.5 * theta[..., :-1].square().sum(dim=(-1, -2))
    return C * loss + penalty, log_p.exp()


def newton_direction(theta: Tensor, features: Tensor, targets: Tensor, probs: Tensor, C: float):
    """The gradient `[T, N, r+1]` and the Newton direction -H^-1 g `[T, N, r+1]`.

    H = C sum_i (diag(p_i) - p_i p_i^T) (x) z_i z_i^T + blockdiag(I_r, 0) per class. It is
    singular in one direction only, b + c*1 (softmax ignores a shift of all logits); the gradient
    is orthogonal to it (sum_n (p_in - y_in) = 0), so adding u u^T for that unit direction u gives
    the minimum-norm Newton step and keeps sum(b) at 0.
    """
    n_tasks, n_way, width = theta.shape
    penalty_grad = F.pad(theta[..., :-1], (0, 1))  # [T, N, r+1], no penalty on b
    grad = C * (probs - targets).transpose(-1, -2) @ features + penalty_grad
    # sum_i diag(p_i) (x) z_i z_i^T: a [r+1, r+1] block per class, on the diagonal.
    blocks = C * torch.einsum("tsn,tsj,tsk->tnjk", probs, features, features)  # [T, N, r+1, r+1]
    blocks = blocks + torch.diag(F.pad(features.new_ones(width - 1), (0, 1)))  # the penalty
    # sum_i (p_i (x) z_i)(p_i (x) z_i)^T, with p_i (x) z_i as the rows of `outer`.
    outer = (probs.unsqueeze(-1) * features.unsqueeze(-2)).reshape(n_tasks, -1, n_way * width)
    hessian = -C * outer.transpose(-1, -2) @ outer  # [T, N*(r+1), N*(r+1)]
    diagonal = hessian.view(n_tasks, n_way, width, n_way, width).diagonal(dim1=1, dim2=3)
    diagonal += blocks.permute(0, 2, 3, 1)
    null = F.pad(features.new_full((n_way, 1), n_way**-0.5), (width - 1, 0)).reshape(-1)
    hessian += torch.outer(null, null)  # the unit vector of b + c*1
    rhs = grad.reshape(n_tasks, -1, 1)
    factor, failed = torch.linalg.cholesky_ex(hessian)
    step = torch.cholesky_solve(rhs, factor)
    if failed.any():  # not positive definite in this precision: LU for those tasks only
        step = torch.where(failed.view(-1, 1, 1) > 0, torch.linalg.solve(hessian, rhs), step)
    return grad, -step.reshape(n_tasks, n_way, width)


def step_size(direction: Tensor, theta: Tensor) -> Tensor:
    """Each task's largest Newton step relative to max(1, its largest coefficient): `[T]`."""
    scale = theta.abs().amax(dim=(-1, -2)).clamp(min=1.0)
    return direction.abs().amax(dim=(-1, -2)) / scale


def fit_logistic_regression(
    support: Tensor,  # [T, N*K, D]
    support_y: Tensor,  # [T, N*K]
    n_way: int,
    C: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Each task's multinomial logistic regression (module docstring): weight `[T, N, D]` and
    bias `[T, N]` (summing to 0 over the classes), in the support's dtype.

    A task has converged when its Newton step changes no coefficient by more than `tol` times
    max(1, its largest coefficient): near the optimum the step is the distance to it, so this
    bounds the coefficients' error (a gradient test would not: scikit-learn's, at its default
    tol=1e-4, leaves errors of 1e-3 with 100 support items). It then stops moving. MetarunError
    if some task has not converged in `max_iter` Newton steps.
    """
    n_tasks = support.shape[0]
    basis, _ = torch.linalg.qr(support.transpose(-1, -2))  # [T, D, r], X^T = V R
    reduced = support @ basis  # [T, N*K, r]
    features = F.pad(reduced, (0, 1), value=1.0)  # [T, N*K, r+1], the bias's column
    targets = one_hot(support_y, n_way, support)  # [T, N*K, N]
    theta = support.new_zeros(n_tasks, n_way, features.shape[-1])  # [T, N, r+1]
    steps = 0.5 ** torch.arange(LINE_SEARCH_STEPS, dtype=support.dtype, device=support.device)

    objective, probs = logistic_objective(theta, features, targets, C)
    for _ in range(max_iter):
        grad, direction = newton_direction(theta, features, targets, probs, C)
        active = step_size(direction, theta) > tol  # [T]
        if not active.any():
            break
        # All step sizes at once: [T, L, N, r+1]; the largest with sufficient decrease wins.
        trials = theta.unsqueeze(1) + steps.view(1, -1, 1, 1) * direction.unsqueeze(1)
        trial_objective, _ = logistic_objective(
            trials, features.unsqueeze(1), targets.unsqueeze(1), C
        )
        slope = (grad * direction).sum(dim=(-1, -2))  # [T], negative
        # Near the optimum a step lowers the objective by about its square, below the objective's
        # rounding; without the slack Armijo's test would then fail on noise and stall the fit.
        slack = ROUNDING_SLACK * torch.finfo(objective.dtype).eps * objective.abs()
        bound = objective + slack  # [T]
        decrease = trial_objective <= bound.unsqueeze(1) + ARMIJO * steps * slope.unsqueeze(1)
        found = decrease.any(dim=1)
        first = decrease.to(torch.int8).argmax(dim=1)  # the first True: the largest step
        step = torch.where(active & found, steps[first], torch.zeros_like(steps[first]))
        theta = theta + step.view(-1, 1, 1) * direction
        objective, probs = logistic_objective(theta, features, targets, C)
    else:
        _, direction = newton_direction(theta, features, targets, probs, C)
        residual = step_size(direction, theta).max().item()
        if residual > tol:
            raise MetarunError(
                f"head=logreg did not converge in {max_iter} Newton iterations (relative step "
                f"{residual:.1e} > head.tol={tol:g}); raise head.max_iter or head.tol, or lower "
                f"head.C"
            )
    weight = theta[..., :-1] @ basis.transpose(-1, -2)  # [T, N, D]
    return weight, theta[..., -1]


class LogisticRegressionHead(Head):
    """RFS's logistic regression on frozen embeddings; returns logits `[T, N*Q, N]`.

    C: the inverse penalty weight (scikit-learn's C; RFS: 1); normalize: L2-normalize support and
    query embeddings first (RFS does); max_iter: Newton iterations; tol: the relative Newton-step
    tolerance of `fit_logistic_regression`. A test-time head: the embeddings are detached.
    """

    differentiable = False
    transductive = False

    def __init__(
        self, C: float = 1.0, normalize: bool = True, max_iter: int = 100, tol: float = 1e-5
    ):
        super().__init__()
        if not C > 0:
            raise MetarunError(f"head.C={C} must be positive; set head.C=1.0 (RFS)")
        if max_iter < 1:
            raise MetarunError(
                f"head.max_iter={max_iter} must be at least 1; set head.max_iter=100"
            )
        if not tol > 0:
            raise MetarunError(f"head.tol={tol} must be positive; set head.tol=1e-5")
        self.C = C
        self.normalize = normalize
        self.max_iter = max_iter
        self.tol = tol

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        self.check_episode(support, query)
        support, query = at_least_float32(support.detach(), query.detach())
        with torch.no_grad(), torch.autocast(support.device.type, enabled=False):
            if self.normalize:
                support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
            weight, bias = fit_logistic_regression(
                support, support_y, n_way, self.C, self.max_iter, self.tol
            )
            return query @ weight.transpose(-1, -2) + bias.unsqueeze(-2)  # [T, N*Q, N]
