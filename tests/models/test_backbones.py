"""The backbone protocol, checked for every backbone (narrow versions): 4-D and 5-D inputs, each task
normalized on its own in `task` mode, and inductive evaluation in `running` mode."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms.maml import MAML
from metarun.algorithms.protonet import ProtoNet
from metarun.models import Conv4, ResNet12, ResNet18, TaskBatchNorm
from metarun.models.layers import commit_running_statistics
from tests.algorithms.synthetic import random_tasks

BACKBONES = {
    "conv4": lambda **kw: Conv4(in_channels=3, hidden=8, image_size=16, **kw),
    "resnet12": lambda **kw: ResNet12(in_channels=3, image_size=16, channels=[8, 8, 16, 16], **kw),
    "resnet18": lambda **kw: ResNet18(in_channels=3, image_size=16, width=8, **kw),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_embeds_4d_and_5d_batches_in_out_features(name):
    model = BACKBONES[name]()
    assert (
        model.in_shape == (3, 16, 16) and model.out_features == torch.tensor(model.out_shape).prod()
    )
    assert model(torch.randn(6, 3, 16, 16)).shape == (6, model.out_features)
    assert model(torch.randn(2, 4, 3, 16, 16)).shape == (2, 4, model.out_features)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_normalizes_each_task_with_its_own_statistics(name):
    torch.manual_seed(0)
    model = BACKBONES[name]().double()
    x = torch.randn(3, 4, 3, 16, 16, dtype=torch.float64)  # [T, B, C, H, W]
    alone = torch.stack([model(task) for task in x])  # [T, B, D]
    torch.testing.assert_close(model(x), alone, rtol=0, atol=1e-12)
    # The all-tasks-in-one-call path (taken on GPUs) gives the same per-task result...
    batched = model.features(x.flatten(0, 1), 3).flatten(1).unflatten(0, (3, 4))
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-10)
    # ...and statistics over all 12 images would not: the per-task split matters.
    pooled = model(x.flatten(0, 1)).unflatten(0, (3, 4))
    assert (pooled - alone).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_in_running_mode_tracks_statistics_and_embeds_each_item_alone_in_eval(name):
    torch.manual_seed(0)
    model = BACKBONES[name](batch_norm="running")
    norms = [m for m in model.modules() if isinstance(m, TaskBatchNorm)]
    assert norms and all(norm.mode == "running" for norm in norms)
    model(
        torch.randn(2, 5, 3, 16, 16) * 3 + 1
    )  # training: the statistics move at the end of the meta-batch
    commit_running_statistics(model)
    assert all((norm.running_mean != 0).any() and (norm.running_var != 1).any() for norm in norms)
    model.eval()
    before = [norm.running_mean.clone() for norm in norms]
    x = torch.randn(5, 3, 16, 16)
    others = torch.cat([x[:1], torch.randn(3, 3, 16, 16) * 5])
    torch.testing.assert_close(model(others)[0], model(x)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=0, atol=1e-5)
    assert all(
        torch.equal(norm.running_mean, b) for norm, b in zip(norms, before)
    )  # eval leaves them


@pytest.mark.parametrize("learner", ["protonet", "maml"])
@pytest.mark.parametrize("backbone", ["conv4-32", "resnet12"])
def test_natural_image_backbones_fit_an_84x84_batch_with_protonet_and_second_order_maml(
    backbone, learner
):
    # mini-ImageNet-shaped synthetic tasks; ResNet-12 narrowed (its full widths take seconds a step here).
    torch.manual_seed(0)
    model = (
        Conv4(in_channels=3, hidden=32, image_size=84)
        if backbone == "conv4-32"
        else ResNet12(in_channels=3, image_size=84, channels=[4, 4, 8, 8])
    )
    assert model.out_shape == ((32, 5, 5) if backbone == "conv4-32" else (8, 5, 5))
    meta = (
        ProtoNet(model, 5)
        if learner == "protonet"
        else MAML(model, 5, inner_lr=0.01, adaptation_steps=1)
    )
    tasks = random_tasks(T=2, queries=2, image_size=84, dtype=torch.float32, channels=3)
    optimizer = torch.optim.Adam(meta.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss, _ = meta(tasks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses  # it fits the batch it is trained on
