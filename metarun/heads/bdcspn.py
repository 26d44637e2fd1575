"""Prototype Rectification for Few-Shot Learning (Liu, Song & Qin, 2020): BD-CSPN, the class means
rectified by shifting the queries onto the support and adding the pseudo-labelled queries.

x <- x / ||x||                                   (normalized embeddings, support and query)
xi = mean_S x - mean_Q x,  q <- q + xi      (cross-class bias: queries shifted onto the support)
P_n = mean of the support of class n             (basic prototypes)
X'_n = support of class n + the queries whose nearest P (in cosine) is P_n     (pseudo-labels)
w_{i,n} = exp(eps cos(X'_{i,n}, P_n)) / sum_j exp(eps cos(X'_{j,n}, P_n))
P'_n = sum_i w_{i,n} X'_{i,n}                    (intra-class bias: the rectified prototypes)
logits_n(q) = eps * cos(q, P'_n)                 (the paper classifies by cosine to P')

The paper adds the Z most confident pseudo-labelled queries of each class (`top_z`, confidence
being the cosine to P_n); None adds all of them, as easyfsl's BDCSPN does. Where easyfsl differs
from the paper: its weights are exp(cos) (eps = 1 instead of the paper's 10), it leaves the
embeddings unnormalized, and it scores the unshifted queries, though P' is built from the shifted
ones; here the queries are shifted throughout. The logits are the cosines times eps, the
temperature of the paper's own softmax over cosines, so that their softmax is a usable probability
(the argmax is the paper's prediction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.errors import MetarunError
from metarun.heads.base import Head, at_least_float32, class_means, one_hot


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise cosine similarities `[T, M, D], [T, N, D] -> [T, M, N]`."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)


def shift_queries(support: Tensor, query: Tensor) -> Tensor:
    """The queries `[T, M, D]` plus xi = mean support - mean query, each task's own."""
    return query + (support.mean(dim=1, keepdim=True) - query.mean(dim=1, keepdim=True))


def pseudo_label_mask(query_cosines: Tensor, top_z: int | None) -> Tensor:
    """Which queries join which class `[T, M, N] -> [T, M, N]` (bool): each query its nearest
    prototype's, and with `top_z` only the Z most similar of each class's queries."""
    n_way = query_cosines.shape[-1]
    mask = F.one_hot(query_cosines.argmax(dim=-1), n_way).bool()  # [T, M, N]
    if top_z is not None:
        members = query_cosines.masked_fill(~mask, -torch.inf)
        order = members.argsort(dim=1, descending=True, stable=True)  # [T, M, N]
        rank = order.argsort(dim=1, stable=True)  # each query's place within its class
        mask = mask & (rank < top_z)
    return mask


def rectified_prototypes(
    support: Tensor,  # [T, N*K, D]
    support_y: Tensor,  # [T, N*K]
    query: Tensor,  # [T, M, D], already shifted
    n_way: int,
    epsilon: float,
    top_z: int | None = None,
) -> Tensor:
    """P'_n `[T, N, D]`: the softmax-of-eps-cosine weighted sum of class n's support items and the
    queries pseudo-labelled n, the cosines taken to the basic prototypes P_n."""
    prototypes = class_means(support, support_y, n_way)  # [T, N, D]
    support_mask = one_hot(support_y, n_way, support).bool()  # [T, N*K, N]
    query_cosines = cosine(query, prototypes)  # [T, M, N]
    query_mask = pseudo_label_mask(query_cosines, top_z)
    items = torch.cat([support, query], dim=1)  # [T, N*K + M, D]
    members = torch.cat([support_mask, query_mask], dim=1)  # [T, N*K + M, N]
    scores = epsilon * torch.cat([cosine(support, prototypes), query_cosines], dim=1)
    # Each class has its support items, so no column is all -inf.
    weights = scores.masked_fill(~members, -torch.inf).softmax(dim=1)  # [T, N*K + M, N]
    return weights.transpose(1, 2) @ items


class BDCSPNHead(Head):
    """BD-CSPN: cosine to the rectified prototypes; returns eps times the cosines `[T, N*Q, N]`.

    epsilon: the temperature of the rectification's weights (and of the logits); top_z: Z, the
    pseudo-labelled queries each class takes at most (None: all of them). The defaults and where
    they come from: conf/head/bdcspn.yaml.
    """

    differentiable = False
    transductive = True
    min_query = 2

    def __init__(self, epsilon: float = 10.0, top_z: int | None = None):
        super().__init__()
        if not epsilon > 0:
            raise MetarunError(
                f"head.epsilon={epsilon} must be positive; set head.epsilon=10 (the paper's)"
            )
        if top_z is not None and top_z < 1:
            raise MetarunError(
                f"head.top_z={top_z} must be at least 1; set head.top_z=null to add every "
                f"pseudo-labelled query, or a number of queries per class"
            )
        self.epsilon = epsilon
        self.top_z = top_z

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        self.check_episode(support, query)
        support, query = at_least_float32(support.detach(), query.detach())
        # Full precision under autocast too: bf16 cosines would pick other pseudo-labels.
        with torch.autocast(query.device.type, enabled=False):
            support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
            query = shift_queries(support, query)
            prototypes = rectified_prototypes(
                support, support_y, query, n_way, self.epsilon, self.top_z
            )
            return self.epsilon * cosine(query, prototypes)
