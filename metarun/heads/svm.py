"""MetaOptNet-SVM (Lee, Maji, Ravichandran & Soatto, 2019, "Meta-Learning with Differentiable Convex
Optimization"): a multi-class linear SVM of Crammer & Singer fitted to the support embeddings, solved
in its dual, and differentiated through so that a backbone trains through it episodically.

min_alpha  1/2 sum_n ||w_n||^2 + r/2 ||alpha||^2 - sum_i alpha_{i,y_i}     w_n = sum_i alpha_{i,n} x_i
s.t.       sum_n alpha_{i,n} = 0,   alpha_{i,n} <= C [n = y_i]              (alpha: [N*K, N] a task)
logits_n(q) = scale * w_n . q                                               (scale learned, from 1)

r = 0 is the paper's dual; r = `dual_ridge` = 1 is the authors' code, which adds the
identity to the dual's Hessian (`MetaOptNetHead_SVM_CS`, models/classification_heads.py). The ridge
is the Crammer-Singer SVM of support features x_i extended by sqrt(r) e_i, a coordinate of their
own that the queries do not have; it makes the dual strictly convex, so alpha is unique and has a
derivative. The solver is written here, not taken from qpth (the authors' batched QP solver), which
breaks with PyTorch releases, forms dense (N*K*N)^2 KKT systems, and is run by their code for a
fixed 15 (training) or 3 (testing) iterations without a convergence check.

Solver, for all T tasks at once, in float64 whatever the embeddings' dtype (the systems are
N*K-sized, so float64 costs nothing and keeps the KKT systems exact): a primal-dual interior-point
method (Mehrotra's predictor-corrector) on alpha / C. Its Hessian is the support Gram matrix, the
same for every class, so each Newton step is N Cholesky factorizations of N*K x N*K and one Schur
complement for the equality constraints, not one (N*K*N)-sized system. Once the iterate's active
set (the bounds alpha_{i,n} = C [n = y_i] that hold) stays the same for two steps it is polished:
the KKT system with that set fixed is solved exactly; a task is done when that solution's KKT
residual (bound violation, negative multiplier, stationarity) is under `tol`. So the answer is the exact optimum,
not an interior point near it, and the iteration count is not a hyperparameter of the model.

Gradient: by implicit differentiation of the KKT conditions at the solution (Amos & Kolter, 2017, as
qpth does, restricted to the active set): with the active bounds fixed, alpha and the equality
multipliers solve a linear system in the Gram matrix K, so for a loss l, in beta = alpha / C,
    [H_FF A_F^T; A_F 0] [lambda_F; mu] = [dl/dbeta_F; 0],   dl/dK = -lambda alpha^T
with H = C (K + r I) on the free entries F and A the rows sum_n beta_{i,n}. One more factorization of the kind the solver makes; exact,
unlike backpropagating through a truncated solver, and independent of the iteration count.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metarun.errors import MetarunError
from metarun.heads.base import Head, at_least_float32, one_hot

# Fraction of the step to the boundary an interior-point step takes, so that s and z stay positive.
STEP_TO_BOUNDARY = 0.99


def per_class(matrices: Tensor, v: Tensor) -> Tensor:
    """Class n's matrix times class n's column: `[T, N, S, S], [T, S, N] -> [T, S, N]`."""
    return torch.einsum("tnij,tjn->tin", matrices, v)


def spd_inverse(blocks: Tensor) -> Tensor:
    """Inverses of symmetric positive definite matrices `[..., S, S]`."""
    return torch.cholesky_inverse(torch.linalg.cholesky_ex(blocks).L)


def solve_coupled(
    inverses: Tensor, coupled: Tensor, rhs: Tensor, row_sums: Tensor
) -> tuple[Tensor, Tensor]:
    """The x `[T, S, N]` and nu `[T, S]` with M_n x_n + P_n nu = rhs_n for each class n and
    sum_n x_{i,n} = row_sums_i, given `inverses` M_n^-1 and `coupled` M_n^-1 P_n `[T, N, S, S]`
    (P_n: the rows nu enters; all of them in the interior-point steps)."""
    x0 = per_class(inverses, rhs)  # [T, S, N]
    schur = torch.linalg.cholesky_ex(coupled.sum(dim=1)).L  # [T, S, S]
    nu = torch.cholesky_solve((x0.sum(dim=-1) - row_sums).unsqueeze(-1), schur).squeeze(-1)
    return x0 - per_class(coupled, nu.unsqueeze(-1).expand_as(rhs)), nu


def step_to_boundary(x: Tensor, dx: Tensor) -> Tensor:
    """The largest step in (0, 1] per task `[T]` that keeps `x + step * dx >= 0` (`[T, S, N]`)."""
    ratios = torch.where(dx < 0, -x / dx, torch.full_like(x, float("inf")))
    return ratios.flatten(1).amin(dim=1).clamp(max=1.0)


def newton_step(
    hess: Tensor, upper: Tensor, beta: Tensor, nu: Tensor, s: Tensor, z: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mehrotra's predictor-corrector direction (d_beta, d_nu, d_s, d_z) for the dual in beta
    (`active_set_solution`), with slacks s = upper - beta >= 0 and multipliers z >= 0."""
    r_dual = hess @ beta - upper + nu.unsqueeze(-1) + z  # [T, S, N]
    r_primal = beta + s - upper
    r_equal = beta.sum(dim=-1)  # [T, S]
    inverses = spd_inverse(hess.unsqueeze(1) + torch.diag_embed((z / s).transpose(1, 2)))

    def direction(r_comp: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # Newton's step on the KKT conditions with s o z moved by r_comp; d_s and d_z eliminated.
        rhs = -r_dual - (r_comp + z * r_primal) / s
        d_beta, d_nu = solve_coupled(inverses, inverses, rhs, -r_equal)
        return d_beta, d_nu, -r_primal - d_beta, (r_comp + z * r_primal + z * d_beta) / s

    mu = (s * z).flatten(1).mean(dim=1).view(-1, 1, 1)
    _, _, s_aff, z_aff = direction(-s * z)
    step = torch.minimum(step_to_boundary(s, s_aff), step_to_boundary(z, z_aff)).view(-1, 1, 1)
    mu_aff = ((s + step * s_aff) * (z + step * z_aff)).flatten(1).mean(dim=1).view(-1, 1, 1)
    sigma = (mu_aff / mu) ** 3
    return direction(sigma * mu - s * z - s_aff * z_aff)


def active_set_solution(
    hess: Tensor, upper: Tensor, free: Tensor
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """The dual's solution with the bounds outside `free` (`[T, S, N]` bool) held active.

    With beta = alpha / C the dual reads min sum_n (1/2 beta_n^T H beta_n - upper_n . beta_n)
    s.t. sum_n beta_{i,n} = 0 and beta <= upper, where H = C (K + r I) `[T, S, S]`. Holding
    beta = upper off `free` leaves an equality-constrained QP: one linear system. Returns beta
    `[T, S, N]`, its KKT residual `[T]` (bound violated, multiplier negative, stationarity or
    equality off; the gradient's parts relative to the size of H beta) and the factors M_n^-1 and
    P_n M_n^-1 P_n (for the backward pass). Each sample needs a free class, which `free` must give.
    """
    f = free.to(hess.dtype).transpose(1, 2)  # [T, N, S]
    free_pairs = f.unsqueeze(-1) * f.unsqueeze(-2)  # [T, N, S, S]
    # M_n: H on the free rows and columns, the identity on the active ones.
    inverses = spd_inverse(hess.unsqueeze(1) * free_pairs + torch.diag_embed(1 - f))
    coupled = inverses * free_pairs  # = M_n^-1 P_n: M_n is block diagonal
    rhs = torch.where(free, upper - hess @ torch.where(free, 0.0, upper), upper)  # [T, S, N]
    beta, nu = solve_coupled(inverses, coupled, rhs, torch.zeros_like(rhs[..., 0]))
    gradient = hess @ beta - upper + nu.unsqueeze(-1)  # [T, S, N]; = -z on the active bounds
    size = 1 + (hess @ beta).abs().flatten(1).amax(dim=1)
    residual = torch.stack(
        [
            (beta - upper).clamp(min=0).flatten(1).amax(dim=1),
            beta.sum(dim=-1).abs().amax(dim=1),
            torch.where(free, 0.0, gradient).clamp(min=0).flatten(1).amax(dim=1) / size,
            torch.where(free, gradient, 0.0).abs().flatten(1).amax(dim=1) / size,
        ]
    ).amax(dim=0)
    return beta, torch.nan_to_num(residual, nan=float("inf")), (inverses, coupled)


def crammer_singer_dual(
    gram: Tensor, upper: Tensor, C: float, dual_ridge: float, max_iter: int, tol: float
) -> tuple[Tensor, Tensor]:
    """Solve the dual (module docstring) for T tasks: `gram` K `[T, S, S]`, `upper` the one-hot
    labels `[T, S, N]` (float64). Returns alpha `[T, S, N]` and the free mask `[T, S, N]` (the
    bounds that do not hold at the solution); raises MetarunError if a task is not solved to `tol`
    within `max_iter` interior-point steps."""
    n_tasks, n_support, n_way = upper.shape
    hess = C * (gram + dual_ridge * torch.eye(n_support, dtype=gram.dtype, device=gram.device))
    # beta = upper - 1/N: strictly inside the bounds (slack 1/N) with sum_n beta_{i,n} = 0.
    beta = upper - 1.0 / n_way
    s = torch.full_like(upper, 1.0 / n_way)  # slack: beta + s = upper
    z = torch.ones_like(upper)  # the bounds' multipliers
    nu = torch.zeros_like(upper[..., 0])  # the equality constraints' multipliers, [T, S]
    solution, free_at = torch.zeros_like(upper), torch.ones_like(upper, dtype=torch.bool)
    # The iterates are kept for the unsolved tasks only (`tasks`: their indices), so a solved
    # task costs nothing more and each task's steps are the ones it would take alone.
    tasks = torch.arange(n_tasks, device=gram.device)
    last_free = torch.ones_like(upper, dtype=torch.bool)
    residual = torch.full((n_tasks,), float("inf"), dtype=gram.dtype, device=gram.device)
    for iteration in range(max_iter):
        d_beta, d_nu, d_s, d_z = newton_step(hess, upper, beta, nu, s, z)
        step = STEP_TO_BOUNDARY * torch.minimum(step_to_boundary(s, d_s), step_to_boundary(z, d_z))
        step = step.view(-1, 1, 1)
        beta, s, z = beta + step * d_beta, s + step * d_s, z + step * d_z
        nu = nu + step[..., 0] * d_nu

        # Polish: the bounds whose slack is below their multiplier are taken as active; each
        # sample keeps a free class (its N bounds cannot all hold with sum_n beta = 0). Only
        # once the set has held for two steps (before that it is seldom the solution's), and at
        # the last step.
        free = (s >= z) | one_hot((s - z).argmax(dim=-1), n_way, s).bool()
        settled = (free == last_free).flatten(1).all(dim=1) | (iteration == max_iter - 1)
        candidate, candidate_residual, _ = active_set_solution(
            hess[settled], upper[settled], free[settled]
        )
        residual[settled] = candidate_residual
        solved = residual <= tol  # [unsolved tasks]
        solution[tasks[solved]] = candidate[solved[settled]]
        free_at[tasks[solved]] = free[solved]
        left = ~solved
        if not bool(left.any()):
            return C * solution, free_at
        tasks, hess, upper, residual = tasks[left], hess[left], upper[left], residual[left]
        beta, s, z, nu, last_free = beta[left], s[left], z[left], nu[left], free[left]
    worst = residual.max().item()
    raise MetarunError(
        f"head=svm did not converge in {max_iter} iterations in {len(tasks)} of {n_tasks} "
        f"tasks (KKT residual {worst:.1e} > head.tol={tol:.0e}); raise head.max_iter, or "
        "head.dual_ridge for embeddings whose Gram matrix is ill-conditioned"
    )


class CrammerSingerDual(torch.autograd.Function):
    """alpha `[T, S, N]` from the Gram matrix `[T, S, S]` (float64), with the gradient to the Gram
    matrix by implicit differentiation of the KKT conditions (module docstring)."""

    @staticmethod
    def forward(ctx, gram, upper, C, dual_ridge, max_iter, tol):
        alpha, free = crammer_singer_dual(gram.detach(), upper, C, dual_ridge, max_iter, tol)
        ctx.save_for_backward(gram.detach(), upper, alpha, free)
        ctx.C, ctx.dual_ridge = C, dual_ridge
        return alpha

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_alpha):
        gram, upper, alpha, free = ctx.saved_tensors
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        hess = ctx.C * (gram + ctx.dual_ridge * eye)
        _, _, (inverses, coupled) = active_set_solution(hess, upper, free)
        # The adjoint system in beta = alpha / C: [H_FF A_F^T; A_F 0] [lambda_F; mu] = [dl/dbeta_F; 0].
        grad_beta = torch.where(free, ctx.C * grad_alpha, 0.0)
        lam, _ = solve_coupled(inverses, coupled, grad_beta, torch.zeros_like(grad_beta[..., 0]))
        # K enters only the free rows' stationarity, as C K beta_n: dl/dK = -C lambda beta^T.
        return -lam @ alpha.transpose(1, 2), None, None, None, None, None


def svm_logits(
    support: Tensor,  # [T, N*K, D]
    support_y: Tensor,  # [T, N*K]
    query: Tensor,  # [T, N*Q, D]
    n_way: int,
    C: float,
    dual_ridge: float,
    max_iter: int,
    tol: float,
) -> Tensor:
    """The Crammer-Singer SVM's class scores w_n . q `[T, N*Q, N]`, in float64."""
    support, query = support.double(), query.double()
    gram = support @ support.transpose(1, 2)  # [T, N*K, N*K]
    upper = one_hot(support_y, n_way, support)  # [T, N*K, N]
    alpha = CrammerSingerDual.apply(gram, upper, C, dual_ridge, max_iter, tol)
    weights = alpha.transpose(1, 2) @ support  # [T, N, D]
    return query @ weights.transpose(1, 2)


class SVMHead(Head):
    """MetaOptNet's SVM head (module docstring); `C`, `dual_ridge`: the dual's, `max_iter`, `tol`:
    the solver's cap on interior-point steps and its KKT tolerance; `scale`, learned if
    `learn_scale`, multiplies the logits."""

    differentiable = True

    def __init__(
        self,
        C: float = 0.1,
        dual_ridge: float = 1.0,
        max_iter: int = 50,
        tol: float = 1e-6,
        scale: float = 1.0,
        learn_scale: bool = True,
    ):
        checks = {
            "C": (C, "0.1 (MetaOptNet's)"),
            "dual_ridge": (dual_ridge, "1.0 (MetaOptNet's code), or 1e-6 for the paper's dual"),
            "tol": (tol, "1e-6"),
            "scale": (scale, "1.0 (MetaOptNet's initial value)"),
        }
        for key, (value, fix) in checks.items():
            if not value > 0:
                raise MetarunError(f"head.{key}={value} must be positive; set head.{key}={fix}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise MetarunError(
                f"head.max_iter={max_iter} must be a positive integer; set head.max_iter=50"
            )
        super().__init__()
        self.C, self.dual_ridge = float(C), float(dual_ridge)
        self.max_iter, self.tol = max_iter, float(tol)
        # A plain number unless learned, so that a fixed scale adds no parameter.
        self.scale = nn.Parameter(torch.tensor(float(scale))) if learn_scale else float(scale)

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        support, query = at_least_float32(support, query)
        scores = svm_logits(
            support, support_y, query, n_way, self.C, self.dual_ridge, self.max_iter, self.tol
        ).to(support.dtype)
        if isinstance(self.scale, nn.Parameter) or self.scale != 1.0:
            scores = scores * self.scale
        return scores
