"""Transductive Information Maximization for Few-Shot Learning (Boudiaf, Ziko, Rony, Dolz,
Piantanida & Ben Ayed, 2020): TIM-GD, the classifier fitted by gradient descent on the support
cross-entropy minus the mutual information between the queries and their predicted labels.

z = x / ||x||                                   (L2-normalized embeddings, the authors' "L2N")
w_n <- mean of z over the support of class n     (prototypes: the support-based init)
p(n | z) = softmax_n(-tau/2 ||z - w_n||^2)      (the paper's classifier)
min_w  lambda * CE(S) - (H(Y_Q) - alpha * H(Y_Q | X_Q))
H(Y_Q) = -sum_n pbar_n log pbar_n,  pbar = mean over the queries of p(. | z)     (marginal entropy)
H(Y_Q | X_Q) = mean over the queries of -sum_n p(n | z) log p(n | z)          (conditional entropy)

The hyperparameters are the authors' (github.com/mboudiaf/TIM, src/tim.py's config: tau = 15,
loss weights [lambda, 1, alpha] = [0.1, 1.0, 0.1], Adam at lr 1e-4; scripts/evaluate/tim_gd: 1000
iterations). easyfsl's TIM differs: cosine logits (`classifier="cosine"` here, also an option of
the authors' code), tau = 10, lambda = 1, 50 steps, and no normalization of the embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.errors import MetarunError
from metarun.heads.base import Head, at_least_float32, class_means

CLASSIFIERS = ("l2", "cosine")


def tim_logits(z: Tensor, weights: Tensor, classifier: str, temperature: float) -> Tensor:
    """`[T, M, D], [T, N, D] -> [T, M, N]`: -tau/2 ||z - w_n||^2 (l2, written as the authors' code
    expands it, z.w - |w|^2/2 - |z|^2/2) or tau * cos(z, w_n) (cosine)."""
    if classifier == "cosine":
        return temperature * F.normalize(z, dim=-1) @ F.normalize(weights, dim=-1).transpose(1, 2)
    dots = z @ weights.transpose(1, 2)  # [T, M, N]
    half_w = 0.5 * weights.square().sum(dim=-1).unsqueeze(1)  # [T, 1, N]
    half_z = 0.5 * z.square().sum(dim=-1, keepdim=True)  # [T, M, 1]
    return temperature * (dots - half_w - half_z)


def tim_loss(
    support_logits: Tensor,  # [T, N*K, N]
    support_y: Tensor,  # [T, N*K]
    query_logits: Tensor,  # [T, N*Q, N]
    cross_entropy_weight: float,
    marginal_entropy_weight: float,
    conditional_entropy_weight: float,
) -> Tensor:
    """Each task's TIM loss `[T]`: lambda * CE - (H(Y_Q) - alpha * H(Y_Q | X_Q)), the terms means
    over the task's items as in the paper."""
    cross_entropy = F.cross_entropy(
        support_logits.transpose(1, 2), support_y, reduction="none"
    ).mean(dim=1)  # [T]
    log_p = query_logits.log_softmax(dim=-1)  # [T, N*Q, N]
    p = log_p.exp()
    conditional_entropy = -(p * log_p).sum(dim=-1).mean(dim=1)  # [T]
    marginal = p.mean(dim=1)  # [T, N]
    marginal_entropy = -(marginal * marginal.log()).sum(dim=-1)  # [T]
    return cross_entropy_weight * cross_entropy - (
        marginal_entropy_weight * marginal_entropy
        - conditional_entropy_weight * conditional_entropy
    )


def tim_gd(
    support: Tensor,  # [T, N*K, D], normalized, detached
    support_y: Tensor,  # [T, N*K]
    query: Tensor,  # [T, N*Q, D], normalized, detached
    n_way: int,
    *,
    classifier: str,
    temperature: float,
    iterations: int,
    lr: float,
    cross_entropy_weight: float,
    marginal_entropy_weight: float,
    conditional_entropy_weight: float,
) -> Tensor:
    """The fitted prototypes `[T, N, D]`, detached.

    All T tasks' prototypes are one parameter trained by one torch.optim.Adam, as the authors' code
    batches tasks: the loss is the sum over tasks of each task's loss, so each task's prototypes get
    exactly their own gradient, and Adam's update is elementwise, so each task's result is its own.
    """
    weights = class_means(support, support_y, n_way).clone().requires_grad_()
    optimizer = torch.optim.Adam([weights], lr=lr)
    # Gradients even when the caller evaluates under torch.no_grad(); full precision under autocast.
    with torch.enable_grad(), torch.autocast(support.device.type, enabled=False):
        for _ in range(iterations):
            loss = tim_loss(
                tim_logits(support, weights, classifier, temperature),
                support_y,
                tim_logits(query, weights, classifier, temperature),
                cross_entropy_weight,
                marginal_entropy_weight,
                conditional_entropy_weight,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
    return weights.detach()


class TIMHead(Head):
    """TIM-GD on frozen embeddings; returns the logits `[T, N*Q, N]` of the fitted classifier
    (-tau/2 times the squared distances to the prototypes, or tau times the cosines).

    classifier: "l2" (the paper's) or "cosine" (easyfsl's); temperature: tau; iterations and lr:
    Adam's steps on the full support and query set and its learning rate; cross_entropy_weight,
    marginal_entropy_weight, conditional_entropy_weight: lambda, the weight of H(Y_Q), alpha. The
    defaults and where they come from: conf/head/tim.yaml.
    """

    differentiable = False
    transductive = True
    min_query = 2

    def __init__(
        self,
        classifier: str = "l2",
        temperature: float = 15.0,
        iterations: int = 1000,
        lr: float = 1e-4,
        cross_entropy_weight: float = 0.1,
        marginal_entropy_weight: float = 1.0,
        conditional_entropy_weight: float = 0.1,
    ):
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise MetarunError(
                f"head.classifier={classifier!r} is not one of {', '.join(CLASSIFIERS)}; "
                f"set head.classifier=l2 (the paper's) or cosine (easyfsl's)"
            )
        if iterations < 0:
            raise MetarunError(
                f"head.iterations={iterations} must be at least 0; set head.iterations=1000 "
                f"(the paper's) or 0 for the support prototypes"
            )
        for key, value in (("temperature", temperature), ("lr", lr)):
            if not value > 0:
                raise MetarunError(
                    f"head.{key}={value} must be positive; pass head.{key}=<a value > 0>"
                )
        for key, value in (
            ("cross_entropy_weight", cross_entropy_weight),
            ("marginal_entropy_weight", marginal_entropy_weight),
            ("conditional_entropy_weight", conditional_entropy_weight),
        ):
            if not value >= 0:
                raise MetarunError(
                    f"head.{key}={value} must be at least 0; see conf/head/tim.yaml for the "
                    f"paper's weights (0.1, 1.0, 0.1)"
                )
        self.classifier = classifier
        self.temperature = temperature
        self.iterations = iterations
        self.lr = lr
        self.cross_entropy_weight = cross_entropy_weight
        self.marginal_entropy_weight = marginal_entropy_weight
        self.conditional_entropy_weight = conditional_entropy_weight

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        self.check_episode(support, query)
        support, query = at_least_float32(support.detach(), query.detach())
        # Full precision under autocast too: the iterations would drift in bf16 matmuls.
        with torch.autocast(query.device.type, enabled=False):
            support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
            weights = tim_gd(
                support,
                support_y,
                query,
                n_way,
                classifier=self.classifier,
                temperature=self.temperature,
                iterations=self.iterations,
                lr=self.lr,
                cross_entropy_weight=self.cross_entropy_weight,
                marginal_entropy_weight=self.marginal_entropy_weight,
                conditional_entropy_weight=self.conditional_entropy_weight,
            )
            return tim_logits(query, weights, self.classifier, self.temperature)
