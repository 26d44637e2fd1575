"""The unit of meta-learning work: a batch of N-way K-shot tasks as stacked tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TaskBatch:
    """T tasks, each N classes with K support and Q query items, labels 0..N-1."""

    support_x: torch.Tensor  # [T, N*K, C, H, W]
    support_y: torch.Tensor  # [T, N*K]
    query_x: torch.Tensor  # [T, N*Q, C, H, W]
    query_y: torch.Tensor  # [T, N*Q]
    n_way: int
    # The split's class index behind each label (label j of task t is class classes[t, j]), for
    # learners that train on the classes themselves (Baseline); None in hand-made batches.
    classes: torch.Tensor | None = None  # [T, N]

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str) -> TaskBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return TaskBatch(
            move(self.support_x),
            move(self.support_y),
            move(self.query_x),
            move(self.query_y),
            self.n_way,
            move(self.classes),
        )

    def __getitem__(self, tasks: slice) -> TaskBatch:
        """The tasks a slice selects, as a TaskBatch (views, no copies)."""
        classes = None if self.classes is None else self.classes[tasks]
        return TaskBatch(
            self.support_x[tasks],
            self.support_y[tasks],
            self.query_x[tasks],
            self.query_y[tasks],
            self.n_way,
            classes,
        )

    def task(self, i: int) -> TaskBatch:
        """Task i alone, still with a leading task dimension of 1."""
        return self[i : i + 1]

    def split(self, size: int) -> list[TaskBatch]:
        """Consecutive batches of `size` tasks (the last one smaller when `size` does not divide T)."""
        return [self[start : start + size] for start in range(0, len(self), size)]
