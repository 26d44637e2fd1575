"""Leveraging the Feature Distribution in Transfer-based Few-Shot Learning (Hu, Gripon & Pateux,
2021): PT-MAP, power-transformed embeddings and class centres estimated by maximum a posteriori
with an optimal-transport assignment of the queries to balanced classes.

f(x) = (x + 1e-6)^beta, x >= 0                   (power transform, beta = 0.5)
f <- f / ||f||; then support and query each centred on its own mean and normalized again
c_n = mean of the support of class n             (class centres, the support-based init)
repeat `iterations` times:
  P = Sinkhorn(exp(-lambda ||f_q - c_n||^2)), rows summing to 1, columns to |Q| / N
  c_n <- c_n + alpha (mean of the support of class n and the queries weighted by P[:, n] - c_n)
logits = log P, from the final centres

The paper assumes ReLU embeddings, x >= 0; embeddings with negative entries are clipped at 0 first
(as easyfsl's power_transform), which leaves those unchanged. The normalization and the centring
after the power transform are the authors' (github.com/yhu01/PT-MAP, test_standard.py: its QR
reduction is an isometry of the items, which leaves the distances and so the result unchanged, and
is left out); easyfsl applies neither. The hyperparameters are the authors' (test_standard.py:
lambda = 10, alpha = 0.2, 20 iterations; easyfsl runs 10), as is the Sinkhorn loop: until no row sum
moves by more than 1e-6 in an iteration, at most 1000 iterations, each task to its own stop here.
The columns' mass |Q| / N is the paper's balanced-classes assumption.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.errors import MetarunError
from metarun.heads.base import Head, at_least_float32, class_means, one_hot

# The authors' Sinkhorn stopping rule (compute_optimal_transport's epsilon and maxiters).
SINKHORN_TOLERANCE = 1e-6
SINKHORN_MAX_ITERATIONS = 1000
# The paper's epsilon in (x + epsilon)^beta.
POWER_OFFSET = 1e-6


def power_transform(x: Tensor, beta: float) -> Tensor:
    """`[T, M, D] -> [T, M, D]`: (max(x, 0) + 1e-6)^beta, each item normalized to unit length."""
    return F.normalize((x.clamp_min(0) + POWER_OFFSET).pow(beta), dim=-1)


def center(x: Tensor) -> Tensor:
    """The items `[T, M, D]` minus their task's mean, each normalized to unit length again."""
    return F.normalize(x - x.mean(dim=1, keepdim=True), dim=-1)


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """`[T, M, D], [T, N, D] -> [T, M, N]`, as the difference."""
    return (a.unsqueeze(2) - b.unsqueeze(1)).square().sum(dim=-1)


def sinkhorn(cost: Tensor, lambda_regularization: float) -> Tensor:
    """The transport plan `[T, M, N] -> [T, M, N]` from exp(-lambda * cost): rows summing to 1,
    columns to M / N.

    The authors' loop: scale the rows, then the columns, while some row sum moved by more than
    SINKHORN_TOLERANCE in the previous iteration. Each task stops at its own iteration and keeps its
    plan from then on, so its result does not depend on the other tasks in the batch.
    """
    n_query, n_way = cost.shape[1:]
    plan = torch.exp(-lambda_regularization * cost)
    plan = plan / plan.sum(dim=(1, 2), keepdim=True)
    previous_rows = torch.zeros_like(plan[..., 0])  # [T, M]
    running = torch.ones(cost.shape[:1], dtype=torch.bool, device=cost.device)  # [T]
    for _ in range(SINKHORN_MAX_ITERATIONS):
        rows = plan.sum(dim=2)  # [T, M]
        running = running & ((previous_rows - rows).abs().amax(dim=1) > SINKHORN_TOLERANCE)
        if not running.any():
            break
        previous_rows = rows
        scaled = plan / rows.unsqueeze(2)
        scaled = scaled * (n_query / n_way / scaled.sum(dim=1, keepdim=True))
        plan = torch.where(running[:, None, None], scaled, plan)
    return plan


def ptmap(
    support: Tensor,  # [T, N*K, D], transformed
    support_y: Tensor,  # [T, N*K]
    query: Tensor,  # [T, M, D], transformed
    n_way: int,
    *,
    lambda_regularization: float,
    alpha: float,
    iterations: int,
) -> Tensor:
    """The queries' soft assignments `[T, M, N]` (the final transport plan) after `iterations`
    MAP updates of the class centres."""
    centres = class_means(support, support_y, n_way)  # [T, N, D]
    support_mask = one_hot(support_y, n_way, support)  # [T, N*K, N]
    items = torch.cat([support, query], dim=1)  # [T, N*K + M, D]
    for _ in range(iterations):
        plan = sinkhorn(squared_distances(query, centres), lambda_regularization)
        mask = torch.cat([support_mask, plan], dim=1)  # [T, N*K + M, N]
        estimate = (mask.transpose(1, 2) @ items) / mask.sum(dim=1).unsqueeze(-1)  # [T, N, D]
        centres = centres + alpha * (estimate - centres)
    return sinkhorn(squared_distances(query, centres), lambda_regularization)


class PTMAPHead(Head):
    """PT-MAP; returns log P `[T, N*Q, N]`, the log of the queries' soft assignments: logits whose
    argmax is the paper's prediction and whose softmax is P's rows normalized (they sum to 1 only
    as closely as the Sinkhorn loop converged, about 1e-4).

    beta: the power transform's exponent; lambda_regularization: lambda, the Sinkhorn kernel's
    scale; alpha: the centres' step towards their estimate; iterations: the MAP updates. The
    defaults and where they come from: conf/head/ptmap.yaml.
    """

    differentiable = False
    transductive = True
    min_query = 2

    def __init__(
        self,
        beta: float = 0.5,
        lambda_regularization: float = 10.0,
        alpha: float = 0.2,
        iterations: int = 20,
    ):
        super().__init__()
        for key, value in (("beta", beta), ("lambda_regularization", lambda_regularization)):
            if not value > 0:
                raise MetarunError(
                    f"head.{key}={value} must be positive; see conf/head/ptmap.yaml for the "
                    f"paper's value"
                )
        if not 0 < alpha <= 1:
            raise MetarunError(
                f"head.alpha={alpha} must be in (0, 1]; set head.alpha=0.2 (the paper's)"
            )
        if iterations < 0:
            raise MetarunError(
                f"head.iterations={iterations} must be at least 0; set head.iterations=20 "
                f"(the paper's)"
            )
        self.beta = beta
        self.lambda_regularization = lambda_regularization
        self.alpha = alpha
        self.iterations = iterations

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        self.check_episode(support, query)
        support, query = at_least_float32(support.detach(), query.detach())
        # Full precision under autocast too: the iterations would drift in bf16 matmuls.
        with torch.autocast(query.device.type, enabled=False):
            support = center(power_transform(support, self.beta))
            query = center(power_transform(query, self.beta))
            plan = ptmap(
                support,
                support_y,
                query,
                n_way,
                lambda_regularization=self.lambda_regularization,
                alpha=self.alpha,
                iterations=self.iterations,
            )
            # An entry that underflowed to 0 gives a finite logit.
            return plan.clamp_min(torch.finfo(plan.dtype).tiny).log()
