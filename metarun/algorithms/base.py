"""The contract every meta-learning algorithm meets, and the helpers they share."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct argmax predictions over the last item dim: `[..., M, N], [..., M] -> [...]`."""
    return (logits.detach().argmax(dim=-1) == labels).float().mean(dim=-1)


class MetaLearner(nn.Module):
    """A backbone `model` wrapped with a meta-learning algorithm for `n_way` classification.

    - `forward(tasks, diagnostics=False) -> (loss, metrics)`: the meta-training loss (scalar, to be
      backpropagated) and detached 0-dim metrics, at least "loss" and "accuracy" (no `.item()`:
      the caller syncs); with `diagnostics`, also metrics that cost extra work (MAML: support
      accuracy before and after adaptation), which the trainer asks for on logging steps only.
    - `evaluate(tasks) -> (loss [T], accuracy [T])`: per-task query loss and accuracy with the
      evaluation settings; safe to call under `torch.no_grad()`.
    - `adapt(support_x [N*K, C, H, W], support_y [N*K])`: a predictor `[M, C, H, W] -> [M, n_way]`
      logits for one task's queries.
    """

    def __init__(self, model: nn.Module, n_way: int):
        super().__init__()
        self.model = model
        self.n_way = n_way

    # What is sized for episode.n_way in learners with a fixed output layer ("head"), for
    # check_n_way's message; None: the learner classifies any number of ways (metric learners).
    fixed_for_n_way: str | None = None

    def check_n_way(self, n_way: int) -> None:
        """Raise MetarunError if this learner cannot classify `n_way`-way tasks."""
        if self.fixed_for_n_way is not None and n_way != self.n_way:
            raise MetarunError(
                f"{type(self).__name__} was built for {self.n_way}-way tasks (its {self.fixed_for_n_way}) but got "
                f"{n_way}-way tasks; set eval.n_way={self.n_way} (fixed at episode.n_way)"
            )

    def forward(self, tasks: TaskBatch, diagnostics: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def evaluate(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError
