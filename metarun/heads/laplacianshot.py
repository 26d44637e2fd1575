"""Laplacian Regularized Few-Shot Learning (Ziko, Dolz, Granger & Ben Ayed, 2020): LaplacianShot,
query assignments that trade the distance to the prototypes against agreeing with their nearest
query neighbours.

x <- x / ||x||                                   (normalized embeddings: the authors' L2N)
m_n = BD-CSPN's rectified prototypes (metarun.heads.bdcspn), or the support class means
a_qn = ||x_q - m_n||^2                            (unary term)
w_qp = 1 if x_p is one of the knn - 1 nearest other queries of x_q, else 0     (kNN affinity)
min_Y  sum_q y_q . a_q - lambda sum_{q,p} w_qp y_q . y_p + sum_q y_q . log y_q
bound optimization (the paper's Algorithm 1): y_q <- softmax(-a_q + lambda sum_p w_qp y_p),
from y_q = softmax(-a_q), until the bound's relative change is at most 1e-6.

The authors' CL2N also centres the embeddings on the training classes' mean first, which this head
leaves to the embedding. The hyperparameters are the authors' (github.com/imtiazziko/LaplacianShot):
knn = 3 counting the query itself, as their create_affinity does (two neighbours), at most 20 bound
updates; lambda is tuned per dataset and shot, 0.7 for miniImageNet 1-shot (0.3 for 5-shot) in
Veilleux et al.'s adaptation of the authors' code (oveilleux/Realistic_Transductive_Few_Shot).
The rectification is easyfsl's LaplacianShot's (BD-CSPN's weighted means of the support and every
pseudo-labelled shifted query; the unary term and the affinity on the unshifted queries) with
BD-CSPN's eps = 10, also that adaptation's; easyfsl weights by exp(cos), eps = 1, and leaves the
embeddings unnormalized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.errors import MetarunError
from metarun.heads.base import Head, at_least_float32, class_means
from metarun.heads.bdcspn import rectified_prototypes, shift_queries

# The authors' stopping rule: the bound changed by at most this fraction of its previous value.
BOUND_TOLERANCE = 1e-6


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """`[T, M, D], [T, N, D] -> [T, M, N]`, as the difference."""
    return (a.unsqueeze(2) - b.unsqueeze(1)).square().sum(dim=-1)


def knn_affinity(query: Tensor, knn: int) -> Tensor:
    """W `[T, M, D] -> [T, M, M]`: row q has a 1 at each of the knn - 1 queries nearest to q other
    than q itself (not symmetrized, as the authors' create_affinity)."""
    distances = torch.cdist(query, query)  # [T, M, M]
    eye = torch.eye(query.shape[1], dtype=torch.bool, device=query.device)
    neighbours = distances.masked_fill(eye, torch.inf).topk(knn - 1, dim=-1, largest=False).indices
    return torch.zeros_like(distances).scatter_(-1, neighbours, 1.0)


def bound(
    assignments: Tensor, unary: Tensor, affinity: Tensor, lambda_regularization: float
) -> Tensor:
    """Each task's bound `[T]`: sum_q y_q . (log y_q + a_q - lambda (W y)_q)."""
    pairwise = affinity @ assignments  # [T, M, N]
    terms = torch.xlogy(assignments, assignments) + assignments * (
        unary - lambda_regularization * pairwise
    )
    return terms.sum(dim=(1, 2))


def bound_updates(
    unary: Tensor, affinity: Tensor, lambda_regularization: float, iterations: int
) -> Tensor:
    """The log assignments `[T, M, N]` after the bound updates.

    Each task stops at its own update (the first, from the third on, whose bound moved by at most
    BOUND_TOLERANCE of the previous one, as the authors' bound_update) and keeps its assignments
    from then on, so its result does not depend on the other tasks in the batch.
    """
    log_y = (-unary).log_softmax(dim=-1)  # [T, M, N]
    previous = torch.full(unary.shape[:1], torch.inf, dtype=unary.dtype, device=unary.device)
    running = torch.ones(unary.shape[:1], dtype=torch.bool, device=unary.device)  # [T]
    for i in range(iterations):
        new_log_y = (-unary + lambda_regularization * (affinity @ log_y.exp())).log_softmax(dim=-1)
        log_y = torch.where(running[:, None, None], new_log_y, log_y)
        energy = bound(new_log_y.exp(), unary, affinity, lambda_regularization)
        converged = (energy - previous).abs() <= BOUND_TOLERANCE * previous.abs()
        stop = running & converged if i > 1 else torch.zeros_like(running)
        previous = torch.where(running, energy, previous)
        running = running & ~stop
        if not running.any():
            break
    return log_y


class LaplacianShotHead(Head):
    """LaplacianShot; returns the log soft assignments `[T, N*Q, N]` (log-probabilities).

    knn: neighbours of each query in the affinity, counting the query itself;
    lambda_regularization: lambda, the weight of the Laplacian term; iterations: the most bound
    updates; prototype_rectification: BD-CSPN's rectified prototypes (the paper's) or the support
    class means; epsilon: the rectification's temperature. The defaults and where they come from:
    conf/head/laplacianshot.yaml.
    """

    differentiable = False
    transductive = True
    min_query = 2

    def __init__(
        self,
        knn: int = 3,
        lambda_regularization: float = 0.7,
        iterations: int = 20,
        prototype_rectification: bool = True,
        epsilon: float = 10.0,
    ):
        super().__init__()
        if knn < 2:
            raise MetarunError(
                f"head.knn={knn} must be at least 2 (it counts the query itself); set head.knn=3 "
                f"(the paper's)"
            )
        if iterations < 0:
            raise MetarunError(
                f"head.iterations={iterations} must be at least 0; set head.iterations=20 "
                f"(the paper's)"
            )
        if not lambda_regularization >= 0:
            raise MetarunError(
                f"head.lambda_regularization={lambda_regularization} must be at least 0; set "
                f"head.lambda_regularization=0.7 (the paper's "
                f"for 1-shot, 0.3 for 5-shot)"
            )
        if not epsilon > 0:
            raise MetarunError(
                f"head.epsilon={epsilon} must be positive; set head.epsilon=10 (BD-CSPN's)"
            )
        self.knn = knn
        self.lambda_regularization = lambda_regularization
        self.iterations = iterations
        self.prototype_rectification = prototype_rectification
        self.epsilon = epsilon

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        self.check_episode(support, query)
        if query.shape[1] < self.knn:
            raise MetarunError(
                f"head=laplacianshot with head.knn={self.knn} needs at least {self.knn} queries "
                f"per task but got {query.shape[1]}; lower head.knn or raise eval.n_query"
            )
        support, query = at_least_float32(support.detach(), query.detach())
        # Full precision under autocast too: the iterations would drift in bf16 matmuls.
        with torch.autocast(query.device.type, enabled=False):
            support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
            if self.prototype_rectification:
                prototypes = rectified_prototypes(
                    support, support_y, shift_queries(support, query), n_way, self.epsilon
                )
            else:
                prototypes = class_means(support, support_y, n_way)
            unary = squared_distances(query, prototypes)  # [T, N*Q, N]
            affinity = knn_affinity(query, self.knn)  # [T, N*Q, N*Q]
            return bound_updates(unary, affinity, self.lambda_regularization, self.iterations)
