"""Meta-testing on fixed episodes: mean accuracy and its 95% confidence interval."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch

from metarun.algorithms.base import MetaLearner
from metarun.data.sampler import EpisodeSampler


def confidence_interval(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% half-width 1.96 * std / sqrt(n) (sample std), as few-shot papers report them."""
    accuracies = accuracies.double()
    n = accuracies.numel()
    std = accuracies.std().item() if n > 1 else 0.0
    return accuracies.mean().item(), 1.96 * std / math.sqrt(n)


@torch.no_grad()
def evaluate(
    learner: MetaLearner,
    sampler: EpisodeSampler,
    episodes: int,
    seed: int,
    batch_size: int,
    autocast: AbstractContextManager | None = None,
    score: str = "accuracy",
) -> dict[str, float]:
    """Loss and score (accuracy, or "mse" for regression) over the fixed episodes
    0..episodes-1 of `sampler`'s split: the mean over episodes and its 95% CI."""
    was_training = learner.training
    learner.eval()
    losses, scores = [], []
    for start in range(0, episodes, batch_size):
        tasks = sampler.episodes(seed, start, min(batch_size, episodes - start))
        with autocast or nullcontext():
            loss, per_task = learner.evaluate(tasks)
        losses.append(loss.float())
        scores.append(per_task.float())
    learner.train(was_training)
    mean, ci95 = confidence_interval(torch.cat(scores).cpu())
    return {"loss": torch.cat(losses).mean().item(), score: mean, "ci95": ci95, "episodes": episodes}
