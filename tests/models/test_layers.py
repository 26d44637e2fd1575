"""Shared layers: batch norm in running mode, and the backbone protocol's checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metarun.algorithms.task_batching import check_task_batching
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from metarun.models.layers import TaskBatchNorm, commit_running_statistics


def test_running_mode_trains_on_batch_statistics_and_tracks_them_like_batchnorm2d():
    torch.manual_seed(0)
    ours, reference = TaskBatchNorm(3, "running"), nn.BatchNorm2d(3)
    for _ in range(3):  # three meta-batches of one task
        x = torch.randn(8, 3, 4, 4) * 2 + 1
        torch.testing.assert_close(ours(x), reference(x))  # one task: the same normalization...
        commit_running_statistics(ours)
    torch.testing.assert_close(
        ours.running_mean, reference.running_mean
    )  # ...and the same statistics
    torch.testing.assert_close(ours.running_var, reference.running_var)
    ours.eval(), reference.eval()
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(ours(x), reference(x))
    torch.testing.assert_close(ours(x[:1]), ours(x)[:1])  # each item on its own


def test_running_mode_averages_per_task_statistics_and_normalizes_each_task_alone():
    norm = TaskBatchNorm(
        2, "running", momentum=1.0
    )  # momentum 1: the running values are the last batch's
    x = torch.randn(2, 6, 2, 3, 3) + torch.tensor([0.0, 5.0]).view(2, 1, 1, 1, 1)  # [T, B, C, H, W]
    y = norm(x.flatten(0, 1), n_tasks=2).unflatten(0, (2, 6))
    commit_running_statistics(norm)
    per_task_mean = x.mean(dim=(1, 3, 4))  # [T, C]
    torch.testing.assert_close(norm.running_mean, per_task_mean.mean(0))
    torch.testing.assert_close(y[1], norm(x[1], n_tasks=1))


def test_running_mode_refuses_vmap_in_one_line_and_task_batching_falls_back_to_a_loop():
    norm = TaskBatchNorm(2, "running")
    with pytest.raises(MetarunError, match="set algorithm.task_batching=loop") as error:
        torch.func.vmap(lambda x: norm(x))(torch.randn(3, 4, 2, 2, 2))
    assert "\n" not in str(error.value)
    model = Conv4(hidden=4, batch_norm="running")
    assert (
        check_task_batching("auto", model) == "loop"
        and check_task_batching("auto", Conv4(hidden=4)) == "auto"
    )
    with pytest.raises(MetarunError, match="algorithm.task_batching=vmap cannot update"):
        check_task_batching("vmap", model)


def test_an_unknown_batch_norm_mode_is_one_line():
    with pytest.raises(
        MetarunError, match=r"model.batch_norm='batch' is not one of task, running; use"
    ):
        Conv4(batch_norm="batch")


def test_a_backbone_names_both_keys_for_a_wrong_input():
    with pytest.raises(
        MetarunError,
        match=r"Conv4 was built for 1x28x28 inputs but got 3x84x84; set "
        r"model.in_channels=3 model.image_size=84",
    ):
        Conv4(hidden=4)(torch.randn(2, 3, 84, 84))
