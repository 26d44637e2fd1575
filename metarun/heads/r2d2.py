"""Meta-learning with Differentiable Closed-Form Solvers (Bertinetto, Henriques, Torr & Vedaldi,
2019): R2-D2, the ridge-regression differentiable discriminator.

W = X^T (X X^T + lambda I)^-1 Y                  (ridge regression in Woodbury form, Y one-hot)
logits = alpha * Q W + beta                      (lambda, alpha, beta meta-learned)

The base learner is ridge regression of the one-hot support labels, solved in the N*K x N*K
kernel form (`metarun.heads.ridge.ridge_weights`); its regression outputs are calibrated for the
softmax by a learned scale alpha and bias beta, and the penalty lambda is learned too, all three
with the embedding (`algorithm=protonet head=r2d2`). As in the authors' code
(github.com/bertinetto/r2d2, fewshots/models/r2d2.py), a column of ones is appended to the
embeddings (`intercept`), so W carries a per-class bias, penalized with the weights. Initial
values are the authors' code's (scripts/train/conf/fewshots.yaml; fewshots/models/adjust.py):
lambda 50, alpha 1e-4 (their miniImageNet runs; their Omniglot and CIFAR-FS runs start at 10),
beta 0.

Two differences from that code: lambda is learned as log(lambda), so it stays positive and the
system positive definite (their code learns lambda itself, when told to); and lambda is the one in
the equation above, whereas their code divides X and Y by sqrt(N*K) first, which is the equation
with lambda * N*K (so their 50 is 250 here at 5-way 1-shot). beta adds the same number to every
logit, so the softmax and its cross-entropy do not depend on it (its gradient through them is 0);
it is kept because the paper has it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.errors import MetarunError
from metarun.heads.base import Head, at_least_float32, one_hot
from metarun.heads.ridge import ridge_weights


def r2d2_logits(
    support: Tensor,  # [T, N*K, D]
    support_y: Tensor,  # [T, N*K]
    query: Tensor,  # [T, N*Q, D]
    n_way: int,
    lambda_reg: Tensor,
    alpha: Tensor,
    beta: Tensor,
    intercept: bool = True,
) -> Tensor:
    """alpha * Q W + beta with W = X^T (X X^T + lambda I)^-1 Y: `[T, N*Q, N]`; with `intercept`
    the embeddings get a last feature of 1 (a bias per class inside W)."""
    if intercept:
        support, query = F.pad(support, (0, 1), value=1.0), F.pad(query, (0, 1), value=1.0)
    weight = ridge_weights(support, one_hot(support_y, n_way, support), lambda_reg)  # [T, D, N]
    return alpha * (query @ weight) + beta


class R2D2Head(Head):
    """R2-D2's ridge-regression head with learned lambda, alpha and beta; returns logits
    `[T, N*Q, N]`.

    lambda_init: the initial ridge penalty (authors' code: 50); learn_lambda: learn it, stored
    as `log_lambda` (the paper meta-learns it; the authors' config leaves it fixed); alpha_init,
    beta_init: the initial output scale and bias (authors' code: 1e-4 and 0; always learned);
    intercept: append a feature of 1 so the ridge regression fits a bias per class (authors'
    code: yes).
    """

    differentiable = True
    transductive = False

    def __init__(
        self,
        lambda_init: float = 50.0,
        learn_lambda: bool = True,
        alpha_init: float = 1e-4,
        beta_init: float = 0.0,
        intercept: bool = True,
    ):
        super().__init__()
        if not lambda_init > 0:
            raise MetarunError(
                f"head.lambda_init={lambda_init} must be positive; set head.lambda_init=50.0 "
                f"(R2-D2's)"
            )
        if not alpha_init > 0:
            raise MetarunError(
                f"head.alpha_init={alpha_init} must be positive; set head.alpha_init=1e-4 "
                f"(R2-D2's miniImageNet value; 10 for Omniglot and CIFAR-FS)"
            )
        log_lambda = torch.tensor(math.log(lambda_init))
        if learn_lambda:
            self.log_lambda = nn.Parameter(log_lambda)
        else:
            self.register_buffer("log_lambda", log_lambda)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))
        self.intercept = intercept

    @property
    def lambda_reg(self) -> Tensor:
        """The ridge penalty lambda, a 0-dim tensor."""
        return self.log_lambda.exp()

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        self.check_episode(support, query)
        support, query = at_least_float32(support, query)
        dtype = support.dtype
        # The solve needs full precision: under autocast, X X^T would be formed in bf16.
        with torch.autocast(support.device.type, enabled=False):
            return r2d2_logits(
                support,
                support_y,
                query,
                n_way,
                self.log_lambda.to(dtype).exp(),
                self.alpha.to(dtype),
                self.beta.to(dtype),
                self.intercept,
            )
