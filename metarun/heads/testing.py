"""A learner's embeddings classified by another head: what `eval.head=NAME` tests.

`HeadTest(learner, head)` has a learner's `evaluate` and `adapt`: the episode is embedded as the
learner's own classifier sees it (`MetaLearner.embed_episode`, batch-norm statistics as in its
evaluation) and `head` classifies the queries. The query loss is the cross-entropy of the head's
logits (or log-probabilities), in float32 at least.
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaLearner, accuracy
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.heads.base import Head


class HeadTest(nn.Module):
    def __init__(self, learner: MetaLearner, head: Head, algorithm: str = "this algorithm"):
        if not learner.embeds:
            raise MetarunError(
                f"eval.head={head.name}: algorithm={algorithm} has no embedding of the support and "
                "query images to put a head on; use eval.head with protonet, matchingnet, "
                "relationnet, baseline, baselinepp, taskcond, maml, fomaml, metasgd, anil or "
                "reptile, or drop eval.head"
            )
        super().__init__()
        self.learner, self.head = learner, head

    def logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int) -> Tensor:
        support, query = self.learner.embed_episode(support_x, support_y, query_x, n_way)
        return self.head(support, support_y, query, n_way)  # [T, N*Q, N]

    def evaluate(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        logits = self.logits(tasks.support_x, tasks.support_y, tasks.query_x, tasks.n_way).float()
        losses = F.cross_entropy(logits.flatten(0, 1), tasks.query_y.flatten(), reduction="none")
        return losses.view_as(tasks.query_y).mean(dim=1).detach(), accuracy(logits, tasks.query_y)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        n_way = int(support_y.max()) + 1

        def predict(query_x: Tensor) -> Tensor:
            return self.logits(support_x[None], support_y[None], query_x[None], n_way)[0]

        return predict
