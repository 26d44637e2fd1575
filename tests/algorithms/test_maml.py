from functools import partial

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.anil import ANIL
from metarun.algorithms.inner_loop import inner_loop
from metarun.algorithms.maml import MAML
from metarun.algorithms.metasgd import MetaSGD
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from tests.algorithms.synthetic import (
    assert_vmap_matches_loop,
    max_abs_diff,
    meta_gradient,
    perturb_batch_norm,
    random_tasks,
)

F64 = torch.float64


make_tasks = partial(random_tasks, dtype=torch.float32, shuffled=False)  # this file's defaults


def make_maml(hidden=4, layers=4, image_size=28, dtype=F64, seed=0, **kwargs) -> MAML:
    torch.manual_seed(seed)
    learner = MAML(
        Conv4(hidden=hidden, layers=layers, image_size=image_size), n_way=5, **kwargs
    ).to(dtype)
    perturb_batch_norm(learner)
    return learner


def reference_logits(p: dict, x: torch.Tensor, layers: int) -> torch.Tensor:
    """Conv4 + head written out with plain ops (no torch.func, no nn.Module)."""
    for i in range(layers):
        x = F.conv2d(x, p[f"model.backbone.blocks.{i}.conv.weight"], padding=1)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-5)
        x = x * p[f"model.backbone.blocks.{i}.norm.weight"].view(1, -1, 1, 1)
        x = x + p[f"model.backbone.blocks.{i}.norm.bias"].view(1, -1, 1, 1)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), p["model.head.weight"], p["model.head.bias"])


def reference_meta_loss(
    learner: MAML, tasks: TaskBatch, layers: int, steps: int, first_order: bool
):
    """Unrolled MAML, one task after another, inner gradients by torch.autograd.grad."""
    names, params = zip(*learner.named_parameters())
    losses = []
    for t in range(len(tasks)):
        fast = list(params)
        for _ in range(steps):
            support_logits = reference_logits(dict(zip(names, fast)), tasks.support_x[t], layers)
            support_loss = F.cross_entropy(support_logits, tasks.support_y[t])
            grads = torch.autograd.grad(support_loss, fast, create_graph=not first_order)
            fast = [w - learner.inner_lr * g for w, g in zip(fast, grads)]
        query_logits = reference_logits(dict(zip(names, fast)), tasks.query_x[t], layers)
        losses.append(F.cross_entropy(query_logits, tasks.query_y[t]))
    meta_loss = torch.stack(losses).mean()
    return meta_loss, torch.autograd.grad(meta_loss, params)


@pytest.mark.parametrize("task_batching", ["loop", "vmap"])
def test_maml_meta_gradient_matches_unrolled_autograd(task_batching):
    learner = make_maml(task_batching=task_batching)
    tasks = make_tasks(dtype=F64)
    loss, grads, _ = meta_gradient(learner, tasks)
    ref_loss, ref_grads = reference_meta_loss(learner, tasks, layers=4, steps=1, first_order=False)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    diff = max_abs_diff(grads, ref_grads)
    print(f"MAML ({task_batching}) vs unrolled autograd: max abs grad diff {diff:.2e}")
    assert diff < 1e-10


def test_maml_meta_gradient_matches_finite_differences():
    learner = make_maml(
        hidden=3, layers=2, image_size=8, inner_lr=0.5, adaptation_steps=2, task_batching="loop"
    )
    tasks = make_tasks(T=2, image_size=8, dtype=F64)
    _, grads, _ = meta_gradient(learner, tasks)
    eps, worst = 1e-6, 0.0
    with torch.no_grad():
        for p, g in zip(learner.parameters(), grads):
            for j in range(min(3, p.numel())):
                flat = p.view(-1)
                flat[j] += eps
                up = learner(tasks)[0].item()
                flat[j] -= 2 * eps
                down = learner(tasks)[0].item()
                flat[j] += eps
                fd = (up - down) / (2 * eps)
                worst = max(worst, abs(fd - g.view(-1)[j].item()))
    print(f"MAML vs central finite differences: max abs diff {worst:.2e}")
    assert worst < 1e-7


def test_first_order_maml_ignores_second_derivatives():
    learner = make_maml(first_order=True, task_batching="loop")
    tasks = make_tasks(dtype=F64)
    _, grads, _ = meta_gradient(learner, tasks)
    _, first_order_ref = reference_meta_loss(learner, tasks, layers=4, steps=1, first_order=True)
    _, second_order_ref = reference_meta_loss(learner, tasks, layers=4, steps=1, first_order=False)
    diff = max_abs_diff(grads, first_order_ref)
    print(f"FOMAML vs detached-inner-gradient reference: max abs grad diff {diff:.2e}")
    assert diff < 1e-10
    assert max_abs_diff(grads, second_order_ref) > 1e-4


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_and_loop_task_batching_agree(steps, first_order):
    def make(mode):
        return make_maml(adaptation_steps=steps, first_order=first_order, task_batching=mode)

    assert_vmap_matches_loop(make, make_tasks(dtype=F64))


def test_maml_reports_loss_accuracy_and_support_accuracy_before_and_after():
    learner = make_maml(hidden=8, dtype=torch.float32, adaptation_steps=10, task_batching="loop")
    assert set(learner(make_tasks())[1]) == {
        "loss",
        "accuracy",
    }  # the diagnostics cost extra passes
    _, metrics = learner(make_tasks(), diagnostics=True)
    assert set(metrics) == {"loss", "accuracy", "support_acc_before", "support_acc_after"}
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())
    # Ten steps of size 0.4 on five support images memorize them; before, it is chance level.
    assert metrics["support_acc_after"].item() == 1.0
    assert metrics["support_acc_before"].item() < 0.5


def test_evaluate_adapts_under_no_grad_and_matches_adapt():
    learner = make_maml(dtype=torch.float32, eval_adaptation_steps=3, task_batching="loop")
    tasks = make_tasks(T=2)
    with torch.no_grad():
        losses, accs = learner.evaluate(tasks)
        predict = learner.adapt(tasks.support_x[1], tasks.support_y[1])
        logits = predict(tasks.query_x[1])
    assert losses.shape == accs.shape == (2,)
    assert logits.shape == (10, 5)
    torch.testing.assert_close(F.cross_entropy(logits, tasks.query_y[1]), losses[1])
    assert all(p.grad is None for p in learner.parameters())
    # Adaptation changes the predictions: evaluating with zero inner steps gives another loss.
    learner.eval_adaptation_steps = 0
    assert (learner.evaluate(tasks)[0] - losses).abs().max() > 1e-4


def test_loss_scale_leaves_adapted_parameters_unchanged():
    learner = make_maml(dtype=torch.float32)
    tasks = make_tasks()
    params = dict(learner.model.named_parameters())
    kwargs = dict(adaptation_steps=2, inner_lr=0.4)
    plain = inner_loop(learner.model, params, tasks.support_x[0], tasks.support_y[0], **kwargs)
    for scale in (1024.0, 3.7):
        scaled = inner_loop(
            learner.model,
            params,
            tasks.support_x[0],
            tasks.support_y[0],
            loss_scale=scale,
            **kwargs,
        )
        for name in params:
            torch.testing.assert_close(scaled[name], plain[name], rtol=1e-5, atol=1e-6)
    loss = learner(tasks)[0].item()
    assert abs(learner(tasks, loss_scale=1024.0)[0].item() - loss) < 1e-5


def test_inner_loop_adapts_only_the_named_parameters_with_per_parameter_rates():
    learner = make_maml(dtype=F64)
    tasks = make_tasks(dtype=F64)
    params = dict(learner.model.named_parameters())
    head = ["head.weight", "head.bias"]
    rates = {"head.weight": 0.1, "head.bias": torch.full((5,), 0.2, dtype=F64)}
    support_x, support_y = tasks.support_x[0], tasks.support_y[0]
    adapted = inner_loop(
        learner.model,
        params,
        support_x,
        support_y,
        adaptation_steps=1,
        inner_lr=rates,
        adapted_names=head,
    )
    loss = F.cross_entropy(learner.model(tasks.support_x[0]), tasks.support_y[0])
    grads = torch.autograd.grad(loss, [params[n] for n in head])
    for name, g in zip(head, grads):
        torch.testing.assert_close(adapted[name], params[name] - rates[name] * g)
    for name in params:
        if name not in head:
            assert adapted[name] is params[name]


def test_sum_over_k_inner_step_is_the_papers_code_step_and_n_times_the_mean_step():
    # A linear head on 3 features, N = 4 classes of K = 2 support items, written out by hand.
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 4).to(F64)
    params = {name: p.detach() for name, p in head.named_parameters()}
    x = torch.randn(8, 3, dtype=F64)  # [N*K, D]
    y = torch.arange(4).repeat(2)  # [N*K]
    n_way, k_shot, alpha = 4, 2, 0.3
    # MAML's code (cbfinn/maml utils.xent): sum_i CE_i / K, whose gradient in the logits z_i is
    # (softmax(z_i) - onehot(y_i)) / K.
    dz = (
        torch.softmax(x @ params["weight"].T + params["bias"], dim=1) - F.one_hot(y, n_way)
    ) / k_shot  # [N*K, N]
    by_hand = {
        "weight": params["weight"] - alpha * dz.T @ x,
        "bias": params["bias"] - alpha * dz.sum(0),
    }
    step = partial(inner_loop, head, params, x, y, adaptation_steps=1, first_order=True)
    summed = step(inner_lr=alpha, inner_loss="sum_over_k")
    assert max_abs_diff(summed, by_hand) < 1e-14
    # ... the mean loss's step at N times the rate (N = 4 here).
    assert max_abs_diff(summed, step(inner_lr=alpha * n_way, inner_loss="mean")) < 1e-14
    assert max_abs_diff(summed, step(inner_lr=alpha, inner_loss="mean")) > 1e-3


@pytest.mark.parametrize(
    "learner", [MAML, ANIL, MetaSGD]
)  # ANIL and Meta-SGD share MAML's inner loop
def test_inner_loss_sum_over_k_reaches_every_learner_as_n_times_the_rate(learner):
    def make(inner_loss, rate):
        torch.manual_seed(0)
        rates = (
            dict(inner_lr_min=rate, inner_lr_max=rate)
            if learner is MetaSGD
            else dict(inner_lr=rate)
        )
        model = learner(
            Conv4(hidden=4, layers=2, image_size=8),
            n_way=5,
            inner_loss=inner_loss,
            task_batching="loop",
            **rates,
        ).to(F64)
        return perturb_batch_norm(model)

    tasks = make_tasks(T=2, image_size=8, dtype=F64)
    rate = 0.125  # exact in float32, where Meta-SGD's rates are drawn before the learner moves to float64
    summed, mean = make("sum_over_k", rate)(tasks)[0], make("mean", rate * 5)(tasks)[0]
    torch.testing.assert_close(summed, mean, rtol=1e-12, atol=0)
    assert abs(summed.item() - make("mean", rate)(tasks)[0].item()) > 1e-4


@pytest.mark.parametrize(
    "learner", [MAML, ANIL, MetaSGD]
)  # ANIL and Meta-SGD inherit MAML's checks
@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(inner_lr=0.0), "inner_lr=0.0"),
        (dict(adaptation_steps=0), "adaptation_steps=0"),
        (dict(eval_adaptation_steps=-1), "eval_adaptation_steps=-1"),
        (dict(task_batching="parallel"), "auto, vmap, loop"),
        (dict(inner_loss="sum"), "inner_loss='sum' is not one of mean, sum_over_k"),
    ],
)
def test_impossible_hyperparameters_name_the_key(learner, kwargs, key):
    if learner is MetaSGD and "inner_lr" in kwargs:
        kwargs = dict(inner_lr_min=0.0, inner_lr_max=0.0)  # its learned rates start in [min, max]
        key = "inner_lr_max"
    with pytest.raises(MetarunError, match=key):
        learner(Conv4(hidden=4), n_way=5, **kwargs)
