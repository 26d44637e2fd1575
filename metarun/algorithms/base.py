"""The contract every meta-learning algorithm meets, and the helpers they share."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from metarun.data.tasks import TaskBatch


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

    def check_n_way(self, n_way: int) -> None:
        """Raise MetarunError if this learner cannot classify `n_way`-way tasks (default: any)."""

    def forward(self, tasks: TaskBatch, diagnostics: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def evaluate(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError
