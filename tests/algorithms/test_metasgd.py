from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metarun.algorithms.maml import MAML
from metarun.algorithms.metasgd import MetaSGD, rate_key
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from metarun.trainer import Trainer
from tests.algorithms.synthetic import (
    assert_vmap_matches_loop,
    max_abs_diff,
    perturb_batch_norm,
    random_tasks,
)

F64 = torch.float64
SMALL = dict(
    layers=2, image_size=8
)  # a two-block Conv4 on 8x8 images: the same math, a fraction of the time


make_tasks = partial(random_tasks, shuffled=False)  # this file's defaults


def make_metasgd(hidden=4, layers=4, image_size=28, dtype=F64, seed=0, **kwargs) -> MetaSGD:
    torch.manual_seed(seed)
    learner = MetaSGD(
        Conv4(hidden=hidden, layers=layers, image_size=image_size), n_way=5, **kwargs
    ).to(dtype)
    perturb_batch_norm(learner.model)
    return learner


def reference_meta_loss(learner: MetaSGD, tasks: TaskBatch, steps: int, first_order: bool):
    """Unrolled Meta-SGD, one task after another: theta' = theta - alpha * grad by torch.autograd.grad
    on the plain Classifier (no inner_loop, no torch.func transform but functional_call)."""
    names, theta = zip(*learner.model.named_parameters())
    alpha = [learner.inner_lrs[rate_key(name)] for name in names]
    losses = []
    for t in range(len(tasks)):
        fast = list(theta)
        for _ in range(steps):
            logits = functional_call(learner.model, dict(zip(names, fast)), (tasks.support_x[t],))
            grads = torch.autograd.grad(
                F.cross_entropy(logits, tasks.support_y[t]), fast, create_graph=not first_order
            )
            fast = [w - a * g for w, a, g in zip(fast, alpha, grads)]
        logits = functional_call(learner.model, dict(zip(names, fast)), (tasks.query_x[t],))
        losses.append(F.cross_entropy(logits, tasks.query_y[t]))
    meta_loss = torch.stack(losses).mean()
    return meta_loss, torch.autograd.grad(meta_loss, list(theta) + alpha)


def meta_gradient(learner, tasks):
    """Loss, gradients of the initialization, gradients of the rates (if any), metrics."""
    learner.zero_grad()
    loss, metrics = learner(tasks)
    loss.backward()
    theta = [p.grad.clone() for p in learner.model.parameters()]
    rates = (
        [p.grad.clone() for p in learner.inner_lrs.values()] if isinstance(learner, MetaSGD) else []
    )
    return loss.detach(), theta, rates, metrics


@pytest.mark.parametrize("task_batching", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 2])
def test_metasgd_with_equal_rates_matches_maml_loss_and_meta_gradient(task_batching, steps):
    alpha = 0.375  # exact in float32, where the rates are made before .to(float64)
    tasks = make_tasks()
    maml = MAML(
        Conv4(hidden=4),
        n_way=5,
        inner_lr=alpha,
        adaptation_steps=steps,
        task_batching=task_batching,
    ).to(F64)
    metasgd = make_metasgd(
        inner_lr_min=alpha, inner_lr_max=alpha, adaptation_steps=steps, task_batching=task_batching
    )
    maml.model.load_state_dict(metasgd.model.state_dict())
    assert all((rates == alpha).all() for rates in metasgd.inner_lrs.values())
    loss_maml, grads_maml, _, _ = meta_gradient(maml, tasks)
    loss, grads, _, _ = meta_gradient(metasgd, tasks)
    diff = max_abs_diff(grads, grads_maml)
    print(
        f"Meta-SGD (alpha={alpha}) vs MAML, {steps} steps, {task_batching}: loss diff "
        f"{abs(loss.item() - loss_maml.item()):.1e}, max abs grad diff {diff:.2e}"
    )
    assert abs(loss.item() - loss_maml.item()) < 1e-13
    assert diff < 1e-12


@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_gradients_of_initialization_and_rates_match_unrolled_autograd(first_order):
    learner = make_metasgd(adaptation_steps=2, first_order=first_order, task_batching="loop")
    tasks = make_tasks()
    loss, grads, rate_grads, _ = meta_gradient(learner, tasks)
    ref_loss, ref_grads = reference_meta_loss(learner, tasks, steps=2, first_order=first_order)
    n = len(grads)
    theta_diff, rate_diff = (
        max_abs_diff(grads, ref_grads[:n]),
        max_abs_diff(rate_grads, ref_grads[n:]),
    )
    print(
        f"Meta-SGD (first_order={first_order}) vs unrolled autograd: max abs grad diff theta {theta_diff:.2e}, "
        f"alpha {rate_diff:.2e}"
    )
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert theta_diff < 1e-10 and rate_diff < 1e-10
    assert all(g.abs().max() > 0 for g in rate_grads)  # every rate tensor learns, first-order too


def test_metasgd_rate_gradient_matches_finite_differences():
    learner = make_metasgd(
        hidden=3, layers=2, image_size=8, adaptation_steps=2, task_batching="loop"
    )
    tasks = make_tasks(T=2, image_size=8)
    _, _, rate_grads, _ = meta_gradient(learner, tasks)
    eps, worst, checked = 1e-6, 0.0, 0
    with torch.no_grad():
        for rates, g in zip(learner.inner_lrs.values(), rate_grads):
            for j in range(min(3, rates.numel())):
                flat = rates.view(-1)
                flat[j] += eps
                up = learner(tasks)[0].item()
                flat[j] -= 2 * eps
                down = learner(tasks)[0].item()
                flat[j] += eps
                worst = max(worst, abs((up - down) / (2 * eps) - g.view(-1)[j].item()))
                checked += 1
    print(
        f"Meta-SGD rate gradients vs central finite differences ({checked} coordinates): max abs diff {worst:.2e}"
    )
    assert worst < 1e-7


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_and_loop_task_batching_agree(steps, first_order):
    # The rates are parameters too: their meta-gradients are compared with the initialization's.
    def make(mode):
        return make_metasgd(
            adaptation_steps=steps, first_order=first_order, task_batching=mode, **SMALL
        )

    assert_vmap_matches_loop(make, make_tasks(image_size=8))


def test_rates_are_learner_parameters_of_each_parameter_shape_drawn_in_the_range():
    learner = MetaSGD(Conv4(hidden=4), n_way=5, inner_lr_min=0.005, inner_lr_max=0.1)
    names = [name for name, _ in learner.model.named_parameters()]
    assert list(learner.inner_lrs) == [rate_key(name) for name in names]
    for name, p in learner.model.named_parameters():
        rates = learner.inner_lrs[rate_key(name)]
        assert rates.shape == p.shape and rates.requires_grad
        assert 0.005 <= rates.min() and rates.max() <= 0.1
    every = torch.cat([r.flatten() for r in learner.inner_lrs.values()])
    assert every.std() > 0.02  # drawn per coordinate, not one shared value
    assert not hasattr(learner, "inner_lr")  # MAML's scalar is replaced by the learned rates
    # The trainer's optimizer takes learner.parameters(): the rates are among them and move.
    assert {id(r) for r in learner.inner_lrs.values()} <= {id(p) for p in learner.parameters()}
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    before = [r.detach().clone() for r in learner.inner_lrs.values()]
    learner(make_tasks(dtype=torch.float32))[0].backward()
    optimizer.step()
    assert all((r - b).abs().max() > 0 for r, b in zip(learner.inner_lrs.values(), before))
    assert set(learner.state_dict()) >= {f"inner_lrs.{rate_key(name)}" for name in names}


def test_evaluate_adapts_under_no_grad_with_the_learned_rates_and_matches_adapt():
    learner = make_metasgd(dtype=torch.float32, eval_adaptation_steps=2, task_batching="loop")
    tasks = make_tasks(T=2, dtype=torch.float32)
    with torch.no_grad():
        losses, accs = learner.evaluate(tasks)
        logits = learner.adapt(tasks.support_x[1], tasks.support_y[1])(tasks.query_x[1])
    assert losses.shape == accs.shape == (2,) and not losses.requires_grad
    assert logits.shape == (10, 5) and not logits.requires_grad
    torch.testing.assert_close(F.cross_entropy(logits, tasks.query_y[1]), losses[1])
    assert all(p.grad is None for p in learner.parameters())
    # The rates are what adapts: zero rates give the unadapted loss.
    with torch.no_grad():
        for rates in learner.inner_lrs.values():
            rates.zero_()
    learner.eval_adaptation_steps = 0
    unadapted = learner.evaluate(tasks)[0]
    learner.eval_adaptation_steps = 2
    torch.testing.assert_close(learner.evaluate(tasks)[0], unadapted)
    assert (unadapted - losses).abs().max() > 1e-4


def test_metasgd_reports_support_accuracy_before_and_after():
    learner = make_metasgd(
        dtype=torch.float32,
        hidden=8,
        inner_lr_min=0.4,
        inner_lr_max=0.4,
        adaptation_steps=10,
        task_batching="loop",
    )
    _, metrics = learner(make_tasks(dtype=torch.float32), diagnostics=True)
    assert set(metrics) == {"loss", "accuracy", "support_acc_before", "support_acc_after"}
    assert metrics["support_acc_after"].item() == 1.0


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(inner_lr_min=0.2, inner_lr_max=0.1), "inner_lr_min"),
        (dict(inner_lr_min=-0.1, inner_lr_max=0.1), "inner_lr_min"),
    ],  # the step counts and task_batching: MAML's checks (tests/algorithms/test_maml.py)
)
def test_impossible_hyperparameters_name_the_key(kwargs, key):
    with pytest.raises(MetarunError, match=key):
        MetaSGD(Conv4(hidden=4), n_way=5, **kwargs)


def test_metasgd_short_run_learns_well_above_chance(make_config, tmp_path):
    # MAML's short-run settings (tests/test_trainer.py); measured: 77.8% test accuracy.
    cfg = make_config(
        "algorithm=metasgd",
        "episode.meta_batch_size=4",
        "episode.n_query=5",
        "train.steps=40",
        "train.val_every=20",
        "eval.episodes=100",
    )
    results = Trainer(cfg, tmp_path).run()
    assert results["test_accuracy"] >= 0.5
