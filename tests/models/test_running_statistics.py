"""Running batch-norm statistics (`model.batch_norm=running`): one momentum update per meta-batch,
with the mean over its tasks of each task's batch statistics, whichever path computed them (a loop
over tasks, chunks of tasks, all tasks in one call) and whether or not the step was logged."""

from __future__ import annotations

import copy

import pytest
import torch

from metarun.algorithms.maml import MAML
from metarun.algorithms.metalstm import MetaLSTM
from metarun.algorithms.metasgd import MetaSGD
from metarun.algorithms.protonet import ProtoNet
from metarun.algorithms.reptile import Reptile
from metarun.models.conv4 import Conv4
from metarun.models.layers import TaskBatchNorm, commit_running_statistics
from metarun.trainer import meta_backward
from tests.algorithms.synthetic import perturb_batch_norm, random_tasks

F64 = torch.float64
MOMENTUM = 0.1  # TaskBatchNorm's default, as nn.BatchNorm2d's


def norms(module) -> list[TaskBatchNorm]:
    return [m for m in module.modules() if isinstance(m, TaskBatchNorm)]


def buffers(module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in module.named_buffers()}


def record_training_passes(module) -> dict[TaskBatchNorm, list[torch.Tensor]]:
    """{norm: [[T, C, 2] per-task (mean, unbiased var) of each training pass]}, by hand, from hooks."""
    seen: dict[TaskBatchNorm, list[torch.Tensor]] = {norm: [] for norm in norms(module)}
    for norm in seen:

        def hook(norm, args, kwargs):
            if norm.training:
                x, n_tasks = args[0], args[1] if len(args) > 1 else kwargs.get("n_tasks", 1)
                xt = x.detach().unflatten(0, (n_tasks, -1))  # [T, B, C, H, W]
                var, mean = torch.var_mean(xt, dim=(1, 3, 4), correction=1)  # [T, C]
                seen[norm].append(torch.stack([mean, var], dim=-1))

        norm.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def expected_after_one_step(
    start: dict[str, torch.Tensor], module, seen
) -> dict[str, torch.Tensor]:
    """Each norm's running statistics after one update of momentum 0.1 towards the mean over every
    task of every training pass."""
    expected = {}
    names = {norm: name for name, norm in module.named_modules() if isinstance(norm, TaskBatchNorm)}
    for norm, passes in seen.items():
        mean, var = torch.cat(passes).mean(dim=0).unbind(-1)  # [C] each
        prefix = names[norm] + "."
        expected[prefix + "running_mean"] = torch.lerp(
            start[prefix + "running_mean"], mean, MOMENTUM
        )
        expected[prefix + "running_var"] = torch.lerp(start[prefix + "running_var"], var, MOMENTUM)
    return expected


def test_one_task_at_a_time_and_all_tasks_in_one_call_make_one_update_with_the_mean_over_tasks():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 3, 5, 5, dtype=F64) * torch.arange(1.0, 5.0, dtype=F64).view(
        4, 1, 1, 1, 1
    )  # [T, B, C, H, W]
    looped, batched = (TaskBatchNorm(3, "running").double() for _ in range(2))
    for task in x:  # the CPU's path: one call per task
        looped(task)
    batched(x.flatten(0, 1), n_tasks=4)  # the CUDA path: the meta-batch in one call
    assert torch.equal(
        looped.running_mean, torch.zeros(3, dtype=F64)
    )  # nothing moves before the commit
    commit_running_statistics(looped), commit_running_statistics(batched)
    var, mean = torch.var_mean(x, dim=(1, 3, 4), correction=1)  # [T, C]
    for norm in (looped, batched):
        torch.testing.assert_close(
            norm.running_mean, MOMENTUM * mean.mean(0), rtol=1e-13, atol=1e-15
        )
        torch.testing.assert_close(
            norm.running_var, 0.9 + MOMENTUM * var.mean(0), rtol=1e-13, atol=1e-15
        )
    commit_running_statistics(looped)  # nothing pending: no second update
    torch.testing.assert_close(looped.running_mean, MOMENTUM * mean.mean(0), rtol=1e-13, atol=1e-15)


def test_a_backbone_gives_the_same_running_statistics_task_by_task_and_in_one_call():
    torch.manual_seed(0)
    model = Conv4(hidden=4, batch_norm="running").double()
    other = copy.deepcopy(model)
    x = torch.randn(4, 5, 1, 28, 28, dtype=F64)  # [T, B, C, H, W]
    model(x)  # on the CPU: one task at a time
    other.features(x.flatten(0, 1), 4)  # as on CUDA: every task in one call
    commit_running_statistics(model), commit_running_statistics(other)
    for name, value in buffers(model).items():
        torch.testing.assert_close(value, dict(other.named_buffers())[name], rtol=1e-12, atol=1e-14)


def make_maml():
    return MAML(
        perturb_batch_norm(Conv4(hidden=4, batch_norm="running")),
        5,
        inner_lr=0.3,
        adaptation_steps=2,
        eval_adaptation_steps=2,
        task_batching="loop",
    ).double()


def make_protonet():
    return ProtoNet(perturb_batch_norm(Conv4(hidden=4, batch_norm="running")), 5).double()


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
)  # cuda: one call for all tasks
@pytest.mark.parametrize("make_learner", [make_maml, make_protonet], ids=["maml", "protonet"])
def test_one_step_updates_the_running_statistics_once_whatever_the_task_chunk(make_learner, device):
    torch.manual_seed(0)
    learner = make_learner().to(device)
    tasks = random_tasks(T=4, queries=2).to(device)
    start = copy.deepcopy(learner.state_dict())
    after = {}
    for task_chunk in (1, 2, 4):
        learner.load_state_dict(start)
        learner.task_chunk = task_chunk
        seen = record_training_passes(learner)
        meta_backward(learner, tasks)
        after[task_chunk] = buffers(learner)
        for norm in norms(learner):
            norm._forward_pre_hooks.clear()
    expected = expected_after_one_step(start, learner, seen)
    assert expected.keys() == after[1].keys()
    for task_chunk, got in after.items():
        for name, value in expected.items():
            torch.testing.assert_close(
                got[name], value, rtol=1e-11, atol=1e-13, msg=f"task_chunk={task_chunk} {name}"
            )


LEARNERS_WITH_DIAGNOSTICS = {
    "maml": make_maml,
    "metalstm": lambda: MetaLSTM(
        perturb_batch_norm(Conv4(hidden=4, batch_norm="running")),
        5,
        hidden_size=4,
        adaptation_steps=2,
        task_batching="loop",
    ).double(),
    "metasgd": lambda: MetaSGD(
        perturb_batch_norm(Conv4(hidden=4, batch_norm="running")),
        5,
        adaptation_steps=2,
        task_batching="loop",
    ).double(),
    "reptile": lambda: Reptile(
        perturb_batch_norm(Conv4(hidden=4, batch_norm="running")),
        5,
        adaptation_steps=2,
        inner_batch_size=3,
        eval_adaptation_steps=2,
        task_batching="loop",
    ).double(),
}


@pytest.mark.parametrize("name", sorted(LEARNERS_WITH_DIAGNOSTICS))
def test_diagnostics_leave_the_weights_and_running_statistics_as_they_were(name):
    """Logged steps (diagnostics on) and unlogged ones end a few steps with bit-equal state."""
    states = {}
    for diagnostics in (False, True):
        torch.manual_seed(0)
        learner = LEARNERS_WITH_DIAGNOSTICS[name]()
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
        for step in range(3):
            optimizer.zero_grad()
            metrics = meta_backward(
                learner, random_tasks(T=2, queries=2, k_shot=2, seed=step), diagnostics=diagnostics
            )
            optimizer.step()
        assert ("support_acc_before" in metrics) == diagnostics
        states[diagnostics] = copy.deepcopy(learner.state_dict())
    assert any(name.endswith("running_mean") for name in states[False])
    for key, value in states[False].items():
        assert torch.equal(states[True][key], value), key
