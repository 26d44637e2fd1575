"""Meta-testing on fixed episodes: mean accuracy and its 95% confidence interval; and an ensemble's
test, whose members' query class probabilities are averaged (MAML++: Antoniou et al., 2019, "How
to train your MAML", tests the top-5 validation models together):

    p(y | x) = 1/K sum_k softmax(f_k(x))_y,   accuracy = [argmax_y p(y | x) = label],   loss = -log p(label | x)
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from metarun.algorithms.base import MetaLearner
from metarun.data.sampler import EpisodeSampler
from metarun.data.tasks import TaskBatch
from metarun.distributed import Processes
from metarun.errors import MetarunError
from metarun.score import ACCURACY, Score
from metarun.task_workers import evaluation_pays, in_order, threads_for


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
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    score: Score = ACCURACY,
    processes: Processes = Processes(),
) -> dict[str, Any]:
    """Loss and score (metarun.score: accuracy, or the MSE of regression) over the fixed episodes
    0..episodes-1 of `sampler`'s split: the mean over episodes, its 95% CI, and each episode's
    score in episode order (`per_episode`).

    Over several processes each rank evaluates every world_size-th batch of episodes and the
    results are gathered, so every batch holds the same episodes as in one process and the
    numbers are the same. A learner with task workers (metarun.task_workers) scores the episodes of
    a batch on them, each on its own, which gives each the numbers it has in the batch.
    """
    was_training = learner.training
    learner.eval()
    mine = {}
    for start in range(0, episodes, batch_size)[processes.rank :: processes.world_size]:
        tasks = sampler.episodes(seed, start, min(batch_size, episodes - start))
        loss, per_task = evaluate_batch(learner, tasks, autocast)
        mine[start] = (loss.float().cpu(), per_task.float().cpu())
    learner.train(was_training)
    losses, scores = in_episode_order(mine, processes)
    return summary(losses, scores, episodes, score)


def evaluate_batch(
    learner: nn.Module, tasks: TaskBatch, autocast: Callable[[], AbstractContextManager]
) -> tuple[Tensor, Tensor]:
    """`learner.evaluate(tasks)`, on the learner's task workers one episode each where it has them."""
    workers, threads = threads_for(
        getattr(learner, "task_workers", 1), len(tasks), evaluation_pays(learner)
    )
    if workers == 1:
        with autocast():
            return learner.evaluate(tasks)

    def one(runner: nn.Module, task: TaskBatch) -> tuple[Tensor, Tensor]:
        with autocast():
            return runner.evaluate(task)

    losses, scores = zip(*in_order(learner, tasks.split(1), one, workers, threads))
    return torch.cat(losses), torch.cat(scores)


def in_episode_order(mine: dict[int, tuple[Tensor, ...]], processes: Processes) -> list[Tensor]:
    """Every rank's {first episode: tensors of its batch}, gathered and concatenated in episode order."""
    batches = {start: result for part in processes.gather(mine) for start, result in part.items()}
    return [
        torch.cat([batches[start][i] for start in sorted(batches)])
        for i in range(len(next(iter(batches.values()))))
    ]


def summary(losses: Tensor, scores: Tensor, episodes: int, score: Score) -> dict[str, Any]:
    """The evaluation's record from per-episode losses and scores `[E]`."""
    mean, ci95 = confidence_interval(scores)
    return {
        "loss": losses.mean().item(),
        score.name: mean,
        "ci95": ci95,
        "episodes": episodes,
        "per_episode": scores.tolist(),
    }


# -- an ensemble of checkpoints (eval.ensemble_top_k) -----------------------------------------------
def check_ensemble(top_k: int, tester: nn.Module, score: Score, dataset: str) -> None:
    """An ensemble averages per-query class probabilities: one line, before any work, for tasks
    that have none (regression) and for a learner without `adapt(support) -> predict(query)`."""
    if top_k == 1:
        return
    if score is not ACCURACY:
        raise MetarunError(
            f"eval.ensemble_top_k={top_k} averages the class probabilities of the best checkpoints, "
            f"and {dataset}'s tasks are regression (scored by {score.name}); set eval.ensemble_top_k=1"
        )
    if type(tester).adapt is MetaLearner.adapt:
        raise MetarunError(
            f"eval.ensemble_top_k={top_k} averages per-query class probabilities, which "
            f"{type(tester).__name__} does not give (it has no adapt(support) -> predict(query)); "
            "set eval.ensemble_top_k=1"
        )


@torch.no_grad()
def query_probabilities(
    tester: nn.Module,
    sampler: EpisodeSampler,
    episodes: int,
    seed: int,
    batch_size: int,
    autocast: AbstractContextManager | None = None,
    processes: Processes = Processes(),
) -> tuple[Tensor, Tensor]:
    """The softmax of `tester`'s query logits on the fixed episodes 0..episodes-1, each episode
    adapted to on its own (`adapt(support_x, support_y)` then `predict(query_x)`), `[E, M, N]`,
    and the query labels `[E, M]`, on the CPU; episodes split across ranks as in `evaluate`."""
    was_training = tester.training
    tester.eval()
    mine = {}
    for start in range(0, episodes, batch_size)[processes.rank :: processes.world_size]:
        tasks = sampler.episodes(seed, start, min(batch_size, episodes - start))
        probabilities = []
        for t in range(len(tasks.query_y)):
            with autocast or nullcontext():
                logits = tester.adapt(tasks.support_x[t], tasks.support_y[t])(tasks.query_x[t])
            probabilities.append(logits.float().softmax(dim=-1).cpu())  # [M, N]
        mine[start] = (torch.stack(probabilities), tasks.query_y.cpu())
    tester.train(was_training)
    probabilities, labels = in_episode_order(mine, processes)
    return probabilities, labels


def ensemble_scores(probabilities: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per episode `[E]`: the NLL of the labels under the averaged probabilities `[E, M, N]` (mean
    over queries), and the accuracy of their argmax."""
    picked = probabilities.gather(-1, labels[..., None])[..., 0]  # [E, M]
    losses = -picked.double().clamp_min(torch.finfo(torch.float64).tiny).log().mean(dim=-1)
    return losses, (probabilities.argmax(dim=-1) == labels).double().mean(dim=-1)


def ensemble_evaluate(
    tester: nn.Module,
    members: Sequence[Any],
    load: Callable[[Any], None],
    sampler: EpisodeSampler,
    episodes: int,
    seed: int,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    processes: Processes = Processes(),
) -> dict[str, Any]:
    """The ensemble's test, with the keys of one model's (`evaluate`): `load(member)` puts each
    member's weights into `tester`, whose query probabilities on the fixed episodes are then
    averaged over the members."""
    probabilities, labels = [], None
    for member in members:
        load(member)
        member_probabilities, labels = query_probabilities(
            tester, sampler, episodes, seed, batch_size, autocast(), processes
        )
        probabilities.append(member_probabilities)
    mean = torch.stack(probabilities).double().mean(dim=0)  # [E, M, N]
    losses, accuracies = ensemble_scores(mean, labels)
    return summary(losses, accuracies, episodes, ACCURACY)
