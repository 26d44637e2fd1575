"""Sinusoid regression tasks: the functions, the points, fixed evaluation tasks, bad episodes."""

from __future__ import annotations

import math

import torch

from metarun.data.sinusoid import Sinusoid
from tests.conftest import one_line_error


def tasks(part="train", n_way=1, k_shot=10, n_query=5):
    return Sinusoid().tasks(part, n_way, k_shot, n_query, "episode", torch.device("cpu"))


def test_points_lie_on_a_sine_of_the_papers_ranges():
    batch, amplitude, phase = tasks("test").functions(seed=0, start=0, count=200)
    assert (
        batch.support_x.shape == (200, 10, 1)
        and batch.query_y.shape == (200, 5, 1)
        and batch.n_way == 1
    )
    assert batch.support_y.dtype == torch.float32
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        torch.testing.assert_close(
            y, amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))
        )
        assert x.min() >= -5 and x.max() <= 5
    assert (
        0.1 <= amplitude.min() and amplitude.max() <= 5.0 and amplitude.max() > 4
    )  # the whole range
    assert 0 <= phase.min() and phase.max() <= math.pi


def test_evaluation_tasks_are_fixed_per_part_and_training_tasks_follow_the_generator():
    a, b = tasks("test").episodes(0, 0, 4), tasks("test").episodes(0, 2, 2)
    assert torch.equal(a.support_x[2:], b.support_x)  # task i depends on (seed, part, i) only
    assert not torch.equal(tasks("val").episodes(0, 0, 4).support_x, a.support_x)  # val != test
    g = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(tasks().sample(8, g()).query_y, tasks().sample(8, g()).query_y)


def test_a_task_with_more_than_one_output_or_no_points_is_one_line():
    assert "set episode.n_way=1" in one_line_error(lambda: tasks(n_way=5))
    assert "episode.k_shot=0 must be a positive integer" in one_line_error(lambda: tasks(k_shot=0))
    assert "dataset.amplitude=[5.0, 0.1] must be [low, high]" in one_line_error(
        lambda: Sinusoid(amplitude=[5.0, 0.1])
    )
