"""Meta-testing on fixed episodes: mean accuracy and its 95% confidence interval."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from metarun.algorithms.base import MetaLearner
from metarun.data.sampler import EpisodeSampler
from metarun.distributed import Processes
from metarun.score import ACCURACY, Score


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
    score: Score = ACCURACY,
    processes: Processes = Processes(),
) -> dict[str, Any]:
    """Loss and score (metarun.score: accuracy, or the MSE of regression) over the fixed episodes
    0..episodes-1 of `sampler`'s split: the mean over episodes, its 95% CI, and each episode's
    score in episode order (`per_episode`).

    Over several processes each rank evaluates every world_size-th batch of episodes and the
    results are gathered, so every batch holds the same episodes as in one process and the
    numbers are the same.
    """
    was_training = learner.training
    learner.eval()
    mine = {}
    for start in range(0, episodes, batch_size)[processes.rank :: processes.world_size]:
        tasks = sampler.episodes(seed, start, min(batch_size, episodes - start))
        with autocast or nullcontext():
            loss, per_task = learner.evaluate(tasks)
        mine[start] = (loss.float().cpu(), per_task.float().cpu())
    learner.train(was_training)
    batches = {start: result for part in processes.gather(mine) for start, result in part.items()}
    losses, scores = (torch.cat([batches[start][i] for start in sorted(batches)]) for i in (0, 1))
    mean, ci95 = confidence_interval(scores)
    return {
        "loss": losses.mean().item(),
        score.name: mean,
        "ci95": ci95,
        "episodes": episodes,
        "per_episode": scores.tolist(),
    }
