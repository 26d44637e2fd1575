"""A Baseline for Few-Shot Image Classification (Dhillon, Chaudhari, Ravichandran & Soatto, 2020):
transductive fine-tuning, here of a new N-way classifier on frozen embeddings.

w_n <- p_n / ||p_n||,  p_n = mean over the support of class n of x / ||x||   (support-based init)
logits_n(x) = tau * w_n . x / ||x||                                           (cosine at the init)
min_w  mean_{(x, y) in S} CE(logits(x), y) + lambda * mean_{x in Q} H(softmax(logits(x)))
H(p) = -sum_n p_n log p_n                               (Shannon entropy of a query's prediction)

The paper fine-tunes the whole network with Adam; on frozen embeddings only w moves. With
`classifier="euclidean"` the classifier is easyfsl's (TransductiveFinetuning): logits_n(x) =
-tau * ||x - w_n||, w_n <- p_n the plain class means of the support embeddings.

The defaults are the paper's budget (Adam, lr 5e-5, 25 steps) and easyfsl's tau = 1: on frozen
embeddings they keep the classifier near its init, as the whole-network fine-tuning stays near the
pre-trained network; conf/head/transductive_finetune.yaml says why a larger budget is not the
default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.errors import MetarunError
from metarun.heads.base import Head, at_least_float32, class_means

CLASSIFIERS = ("cosine", "euclidean")


def init_weights(support: Tensor, support_y: Tensor, n_way: int, classifier: str) -> Tensor:
    """The support-based initialization `[T, N*K, D] -> [T, N, D]`: the normalized class means of
    the normalized embeddings (cosine), or the plain class means (euclidean)."""
    if classifier == "cosine":
        return F.normalize(class_means(F.normalize(support, dim=-1), support_y, n_way), dim=-1)
    return class_means(support, support_y, n_way)


def classifier_logits(x: Tensor, weight: Tensor, classifier: str, temperature: float) -> Tensor:
    """`[T, M, D], [T, N, D] -> [T, M, N]`: tau * w_n . x / ||x|| (cosine) or -tau * ||x - w_n||
    (euclidean; cdist's backward gives a zero gradient at a zero distance, which a 1-shot support
    item has at the init)."""
    if classifier == "cosine":
        return temperature * F.normalize(x, dim=-1) @ weight.transpose(-1, -2)
    return -temperature * torch.cdist(x, weight)


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of the softmax of the logits, `[..., N] -> [...]`, in nats."""
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def transductive_finetune(
    support: Tensor,  # [T, N*K, D], detached
    support_y: Tensor,  # [T, N*K]
    query: Tensor,  # [T, N*Q, D], detached
    n_way: int,
    *,
    classifier: str,
    fine_tuning_steps: int,
    fine_tuning_lr: float,
    temperature: float,
    entropy_weight: float,
) -> Tensor:
    """The fine-tuned classifier weights `[T, N, D]`, detached.

    All T classifiers are one parameter trained by one torch.optim.Adam on full batches (all the
    support and all the queries each step, as the paper's one mini-batch of each per epoch). The
    loss is the sum over tasks of each task's loss, so each task's weights get exactly the gradient
    they would get alone, and Adam's update is elementwise: each task's result is its own.
    """
    weight = init_weights(support, support_y, n_way, classifier).clone().requires_grad_()
    optimizer = torch.optim.Adam([weight], lr=fine_tuning_lr)
    # Gradients even when the caller evaluates under torch.no_grad(); full precision under autocast.
    with torch.enable_grad(), torch.autocast(support.device.type, enabled=False):
        for _ in range(fine_tuning_steps):
            support_logits = classifier_logits(support, weight, classifier, temperature)
            cross_entropy = F.cross_entropy(
                support_logits.transpose(1, 2), support_y, reduction="none"
            ).mean(dim=1)  # [T]
            query_logits = classifier_logits(query, weight, classifier, temperature)
            query_entropy = entropy(query_logits).mean(dim=1)  # [T]
            optimizer.zero_grad(set_to_none=True)
            (cross_entropy + entropy_weight * query_entropy).sum().backward()
            optimizer.step()
    return weight.detach()


class TransductiveFinetuneHead(Head):
    """Transductive fine-tuning of a new classifier on frozen embeddings; returns the fine-tuned
    classifier's logits `[T, N*Q, N]` (tau times the scores it was trained on).

    classifier: "cosine" (the paper's) or "euclidean" (easyfsl's), see the module docstring;
    fine_tuning_steps: Adam steps on the full support and query set (the paper's epochs);
    fine_tuning_lr: Adam's learning rate; temperature: tau, multiplying the scores before the
    softmax; entropy_weight: lambda on the queries' mean entropy (0: plain support fine-tuning from
    the same init, an inductive head). The defaults and where they come from: conf/head/
    transductive_finetune.yaml.
    """

    differentiable = False
    transductive = True
    min_query = 2

    def __init__(
        self,
        classifier: str = "cosine",
        fine_tuning_steps: int = 25,
        fine_tuning_lr: float = 5e-5,
        temperature: float = 1.0,
        entropy_weight: float = 1.0,
    ):
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise MetarunError(
                f"head.classifier={classifier!r} is not one of {', '.join(CLASSIFIERS)}; "
                f"set head.classifier=cosine (the paper's) or euclidean (easyfsl's)"
            )
        if fine_tuning_steps < 0:
            raise MetarunError(
                f"head.fine_tuning_steps={fine_tuning_steps} must be at least 0; "
                f"set head.fine_tuning_steps=25 (the paper's) or 0 for the initial classifier"
            )
        for key, value in (("fine_tuning_lr", fine_tuning_lr), ("temperature", temperature)):
            if not value > 0:
                raise MetarunError(
                    f"head.{key}={value} must be positive; pass head.{key}=<a value > 0>"
                )
        if not entropy_weight >= 0:
            raise MetarunError(
                f"head.entropy_weight={entropy_weight} must be at least 0; set "
                f"head.entropy_weight=1 (the paper's) or 0 for support fine-tuning alone"
            )
        self.classifier = classifier
        self.fine_tuning_steps = fine_tuning_steps
        self.fine_tuning_lr = fine_tuning_lr
        self.temperature = temperature
        self.entropy_weight = entropy_weight

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        self.check_episode(support, query)
        support, query = at_least_float32(support.detach(), query.detach())
        weight = transductive_finetune(
            support,
            support_y,
            query,
            n_way,
            classifier=self.classifier,
            fine_tuning_steps=self.fine_tuning_steps,
            fine_tuning_lr=self.fine_tuning_lr,
            temperature=self.temperature,
            entropy_weight=self.entropy_weight,
        )
        return classifier_logits(query, weight, self.classifier, self.temperature)
