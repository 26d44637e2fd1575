"""Meta-Learning with Differentiable Convex Optimization (Lee, Maji, Ravichandran & Soatto, 2019):
MetaOptNet-RR, the ridge-regression head.

W = argmin_W ||X W - Y||^2 + lambda ||W||^2 = X^T (X X^T + lambda I)^-1 Y     (Y: one-hot [N*K, N])
logits = s * Q W                                                           (no bias; s learned)

One-vs-rest ridge regression of the support's one-hot labels on its embeddings, solved in the
kernel (Woodbury) form: an N*K x N*K system instead of D x D, cheap since N*K << D (25 against
16000 for a 5-way 5-shot ResNet-12), and differentiable, so the embedding is trained through it
(`algorithm=protonet head=ridge`). lambda = 50 and a learned scale s from 1 are the authors'
code (github.com/kjunelee/MetaOptNet, models/classification_heads.py: R2D2Head's
l2_regularizer_lambda and ClassificationHead's `scale`). Their QP-solved "Ridge" head, the
paper's MetaOptNet-RR, returns twice these logits (its linear term is -2Y); the learned scale
absorbs that factor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metarun.errors import MetarunError
from metarun.heads.base import Head, at_least_float32, one_hot


def ridge_weights(support: Tensor, targets: Tensor, lambda_reg: float | Tensor) -> Tensor:
    """Ridge regression weights X^T (X X^T + lambda I)^-1 Y, batched over tasks:
    `[T, S, D], [T, S, N] -> [T, D, N]`; `lambda_reg` a positive number or a 0-dim tensor (a
    learned lambda gets its gradient). Equal to the primal (X^T X + lambda I)^-1 X^T Y."""
    n_support = support.shape[-2]
    gram = support @ support.transpose(-1, -2)  # [T, S, S]
    eye = torch.eye(n_support, dtype=support.dtype, device=support.device)
    # LU, not Cholesky: the system is positive definite, but non-finite embeddings should give
    # non-finite logits for the trainer to report, not an error from inside the factorization.
    dual = torch.linalg.solve(gram + lambda_reg * eye, targets)  # [T, S, N]
    return support.transpose(-1, -2) @ dual


class RidgeHead(Head):
    """MetaOptNet-RR: ridge regression on one-hot support labels; returns logits `[T, N*Q, N]`.

    lambda_reg: the ridge penalty lambda (authors' code: 50); scale: s, the logits' multiplier
    (authors' code: 1, learned); learn_scale: learn s with the embedding (an `nn.Parameter`).
    """

    differentiable = True
    transductive = False

    def __init__(self, lambda_reg: float = 50.0, scale: float = 1.0, learn_scale: bool = True):
        super().__init__()
        if not lambda_reg > 0:
            raise MetarunError(
                f"head.lambda_reg={lambda_reg} must be positive; set head.lambda_reg=50.0 "
                f"(MetaOptNet's)"
            )
        if not scale > 0:
            raise MetarunError(f"head.scale={scale} must be positive; set head.scale=1.0")
        self.lambda_reg = lambda_reg
        scale = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        self.check_episode(support, query)
        support, query = at_least_float32(support, query)
        # The solve needs full precision: under autocast, X X^T would be formed in bf16.
        with torch.autocast(support.device.type, enabled=False):
            weight = ridge_weights(support, one_hot(support_y, n_way, support), self.lambda_reg)
            return self.scale.to(support.dtype) * (query @ weight)  # [T, N*Q, N]
