"""Sinusoid regression (Finn et al., 2017, "Model-Agnostic Meta-Learning", section 5.1).

A task is y = A sin(x - phi) with amplitude A ~ U[0.1, 5.0] and phase phi ~ U[0, pi]; its K support
and Q query points have x ~ U[-5, 5]. Learners fit y from x with the mean squared error, and
report it where classification reports accuracy. Tasks are drawn, not stored: training tasks
from the run's generator, evaluation task i of a part from a generator seeded by (eval.seed, part,
i), as for the image datasets, so every run is tested on the same functions.

Episodes keep the image datasets' TaskBatch: support_x `[T, K, 1]`, support_y `[T, K, 1]` (float),
query_x `[T, Q, 1]`, query_y `[T, Q, 1]`, n_way 1 (one output).
"""

from __future__ import annotations

import math

import torch

from metarun.data.contract import PARTS, TaskDataset
from metarun.data.sampler import episode_seed
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.run_dir import figure_file
from metarun.score import MSE


class SinusoidTasks:
    """The episode source of one part: `sample` (training) and `episodes` (fixed evaluation tasks),
    as EpisodeSampler's. `n_way` must be 1: a regression task has one output."""

    def __init__(
        self,
        dataset: Sinusoid,
        n_way: int,
        k_shot: int,
        n_query: int,
        part: str,
        config_key: str = "episode",
        device: torch.device | str = "cpu",
    ):
        for key, value in (("k_shot", k_shot), ("n_query", n_query)):
            if not isinstance(value, int) or value < 1:
                raise MetarunError(
                    f"{config_key}.{key}={value} must be a positive integer; set {config_key}.{key}>=1"
                )
        if n_way != 1:
            raise MetarunError(
                f"{config_key}.n_way={n_way} but a sinusoid task has one output; set {config_key}.n_way=1 "
                "(the K support points are k_shot)"
            )
        self.dataset, self.k_shot, self.n_query, self.part = dataset, k_shot, n_query, part
        self.device = torch.device(device)

    def sample(self, meta_batch_size: int, generator: torch.Generator) -> TaskBatch:
        return self._draw(meta_batch_size, generator)[0].to(self.device)

    def episodes(self, seed: int, start: int, count: int) -> TaskBatch:
        """Fixed tasks start..start+count-1 of this part: task i depends on (seed, part, i) only."""
        return self.functions(seed, start, count)[0]

    def functions(
        self, seed: int, start: int, count: int
    ) -> tuple[TaskBatch, torch.Tensor, torch.Tensor]:
        """The fixed tasks of `episodes`, with each one's amplitude and phase `[T]` (for plots)."""
        part_seed = seed * len(PARTS) + PARTS.index(self.part)  # val and test tasks differ
        draws = [
            self._draw(1, torch.Generator().manual_seed(episode_seed(part_seed, i)))
            for i in range(start, start + count)
        ]
        fields = ("support_x", "support_y", "query_x", "query_y")
        stacked = {name: torch.cat([getattr(d[0], name) for d in draws]) for name in fields}
        amplitude, phase = (torch.cat([d[k] for d in draws]) for k in (1, 2))
        return TaskBatch(**stacked, n_way=1).to(self.device), amplitude, phase

    def _draw(
        self, n_tasks: int, generator: torch.Generator
    ) -> tuple[TaskBatch, torch.Tensor, torch.Tensor]:
        data = self.dataset
        uniform = lambda low, high, *shape: (
            low
            + (high - low)
            * torch.rand(n_tasks, *shape, generator=generator, device=generator.device)
        )
        amplitude = uniform(*data.amplitude, 1, 1)  # [T, 1, 1]
        phase = uniform(*data.phase, 1, 1)  # [T, 1, 1]
        x = uniform(*data.x_range, self.k_shot + self.n_query, 1)  # [T, K+Q, 1]
        y = amplitude * torch.sin(x - phase)  # [T, K+Q, 1]
        K = self.k_shot
        return (
            TaskBatch(x[:, :K], y[:, :K], x[:, K:], y[:, K:], 1),
            amplitude.flatten(),
            phase.flatten(),
        )


class Sinusoid(TaskDataset):
    """Sinusoid regression tasks: a task dataset scored by MSE, no classes or images."""

    name = "sinusoid"
    score = MSE

    def __init__(
        self,
        amplitude: list[float] = (0.1, 5.0),
        phase: list[float] = (0.0, math.pi),
        x_range: list[float] = (-5.0, 5.0),
    ):
        for key, value in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if len(value) != 2 or not value[0] <= value[1]:
                raise MetarunError(
                    f"dataset.{key}={list(value)} must be [low, high] with low <= high; "
                    f"e.g. dataset.{key}=[0.1,5.0]"
                )
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)
        self.input_shape = (1,)

    def tasks(
        self,
        part: str,
        n_way: int,
        k_shot: int,
        n_query: int,
        config_key: str,
        device: torch.device,
    ) -> SinusoidTasks:
        return SinusoidTasks(self, n_way, k_shot, n_query, part, config_key, device)

    def figures(self, learner, test_tasks: SinusoidTasks, run_dir) -> list:
        """adaptation.png beside results.json (see plot_adaptation)."""
        path = figure_file(run_dir, "adaptation")
        plot_adaptation(learner, test_tasks, path)
        return [path]

    def layout(self) -> dict[str, str]:
        return {
            "layout": f"y = A sin(x - phase), A in {list(self.amplitude)}, phase in "
            f"{[round(p, 4) for p in self.phase]}, x in {list(self.x_range)}: drawn, nothing on disk"
        }


def plot_adaptation(
    learner,
    tasks: SinusoidTasks,
    path,
    seed: int = 0,
    n_tasks: int = 4,
    steps: tuple[int, ...] = (0, 1, 10),
) -> None:
    """adaptation.png: `n_tasks` fixed test functions, their support points, and the learner's
    prediction before adaptation and after each number of inner `steps` (Finn et al., figure 2)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from metarun.atomic import write_atomically

    batch, amplitude, phase = tasks.functions(seed, 0, n_tasks)
    grid = torch.linspace(*tasks.dataset.x_range, 200, device=batch.support_x.device)[
        :, None
    ]  # [200, 1]
    figure, axes = plt.subplots(1, n_tasks, figsize=(4 * n_tasks, 3.2), sharey=True)
    saved = learner.eval_adaptation_steps
    was_training = learner.training
    learner.eval()
    try:
        for t, ax in enumerate(axes):
            truth = amplitude[t] * torch.sin(grid.cpu() - phase[t])
            ax.plot(grid.cpu(), truth, color="black", label="true function")
            ax.scatter(
                batch.support_x[t].cpu(),
                batch.support_y[t].cpu(),
                color="red",
                zorder=3,
                label=f"{tasks.k_shot} support points",
            )
            for s in steps:
                learner.eval_adaptation_steps = s
                prediction = (
                    learner.adapt(batch.support_x[t], batch.support_y[t])(grid).detach().cpu()
                )
                ax.plot(
                    grid.cpu(),
                    prediction,
                    linestyle="--",
                    label="before adaptation"
                    if s == 0
                    else f"after {s} step{'s' if s > 1 else ''}",
                )
            ax.set_xlabel("x")
        axes[0].legend(fontsize=8)
        figure.tight_layout()
        write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=100))
    finally:
        learner.eval_adaptation_steps = saved
        learner.train(was_training)
        plt.close(figure)
