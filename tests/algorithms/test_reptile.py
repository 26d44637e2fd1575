import copy
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.reptile import Reptile, mini_batch_indices, reptile_surrogate
from metarun.config import build
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
from tests.conftest import compose_config

F64 = torch.float64


make_tasks = partial(random_tasks, k_shot=2)  # this file's defaults


def make_reptile(hidden=4, dtype=F64, seed=0, **kwargs) -> Reptile:
    torch.manual_seed(seed)
    learner = Reptile(Conv4(hidden=hidden), n_way=5, **kwargs).to(dtype)
    perturb_batch_norm(learner)
    return learner


def trainer_step(
    learner: Reptile, tasks: TaskBatch, epsilon: float, seed: int
) -> list[torch.Tensor]:
    """What the trainer does with optimizer=sgd (momentum 0, lr epsilon): the parameters after one step."""
    optimizer = torch.optim.SGD(learner.parameters(), lr=epsilon, momentum=0.0)
    torch.manual_seed(seed)  # the mini-batches come from the global RNG
    loss, _ = learner(tasks)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return [p.detach().clone() for p in learner.parameters()]


def reference_reptile_step(
    learner, tasks, epsilon, indices, inner_optimizer, betas=(0.0, 0.999), eps=1e-8
):
    """The paper's update by hand: per task, a copy of theta trained by k steps on its mini-batches
    (torch.autograd.grad, SGD or Adam with fresh moments); then theta + epsilon * mean_i (phi_i - theta)."""
    theta = [p.detach().clone() for p in learner.model.parameters()]
    deltas = []
    for t in range(len(tasks)):
        model = copy.deepcopy(learner.model)
        params = list(model.parameters())
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        for step, rows in enumerate(indices[t], start=1):
            loss = F.cross_entropy(model(tasks.support_x[t][rows]), tasks.support_y[t][rows])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g, m_p, v_p in zip(params, grads, m, v):
                    if inner_optimizer == "sgd":
                        p -= learner.inner_lr * g
                        continue
                    m_p.mul_(betas[0]).add_((1 - betas[0]) * g)
                    v_p.mul_(betas[1]).add_((1 - betas[1]) * g * g)
                    m_hat, v_hat = m_p / (1 - betas[0] ** step), v_p / (1 - betas[1] ** step)
                    p -= learner.inner_lr * m_hat / (v_hat.sqrt() + eps)
        deltas.append([p.detach() - th for p, th in zip(params, theta)])
    mean_delta = [torch.stack(d).mean(dim=0) for d in zip(*deltas)]
    return [th + epsilon * d for th, d in zip(theta, mean_delta)]


def test_reptile_surrogate_gradient_is_theta_minus_target():
    theta = {
        "a": torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True),
        "b": torch.tensor(3.0, dtype=F64, requires_grad=True),
    }
    target = {
        "a": torch.tensor([0.5, 1.0], dtype=F64, requires_grad=True),
        "b": torch.tensor(1.0, dtype=F64),
    }
    loss = reptile_surrogate(theta, target)
    assert loss.item() == 0.5 * (0.25 + 9.0 + 4.0)
    loss.backward()
    assert theta["a"].grad.tolist() == [0.5, -3.0] and theta["b"].grad.item() == 2.0
    assert target["a"].grad is None  # the target is a constant


def test_mini_batch_indices_cut_shuffled_passes_over_the_support_set():
    generator = torch.Generator().manual_seed(0)
    indices = mini_batch_indices(n_items=10, batch_size=4, steps=5, n_tasks=3, generator=generator)
    assert indices.shape == (3, 5, 4) and indices.dtype == torch.long
    flat = indices.flatten(1)  # [T, 20]: two whole passes over the 10 items
    for task in flat:
        assert sorted(task[:10].tolist()) == list(range(10)) and sorted(task[10:].tolist()) == list(
            range(10)
        )
    assert not torch.equal(flat[0], flat[1])  # each task its own order
    # 5 steps x 10 items of 50: the paper's Omniglot setting, one pass, every item once.
    paper = mini_batch_indices(50, 10, 5, 1, generator=torch.Generator().manual_seed(0))
    assert sorted(paper.flatten().tolist()) == list(range(50))


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("task_batching", ["loop", "vmap"])
def test_one_trainer_sgd_step_on_the_surrogate_is_the_papers_reptile_update(
    inner_optimizer, task_batching
):
    settings = dict(
        inner_lr=0.1 if inner_optimizer == "sgd" else 0.01, adaptation_steps=3, inner_batch_size=4
    )
    learner = make_reptile(inner_optimizer=inner_optimizer, task_batching=task_batching, **settings)
    tasks = make_tasks(k_shot=2)  # 10 support items, mini-batches of 4
    epsilon, seed = 0.7, 11
    torch.manual_seed(seed)
    indices = mini_batch_indices(10, 4, 3, len(tasks))  # the draw `forward` makes
    reference = reference_reptile_step(learner, tasks, epsilon, indices, inner_optimizer)
    theta = [p.detach().clone() for p in learner.parameters()]
    updated = trainer_step(learner, tasks, epsilon, seed)
    diff = max_abs_diff(updated, reference)
    print(
        f"Reptile ({inner_optimizer} inner, {task_batching}) vs hand-written update: max abs diff {diff:.2e}"
    )
    assert diff < 1e-12
    assert max_abs_diff(updated, theta) > 1e-3  # the step moved theta


@pytest.mark.parametrize("inner_batch_size", [0, 3])
@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_vmap_and_loop_task_batching_agree(inner_optimizer, inner_batch_size):
    def make(mode):
        return make_reptile(
            inner_optimizer=inner_optimizer,
            inner_lr=0.05,
            inner_batch_size=inner_batch_size,
            eval_adaptation_steps=4,
            eval_inner_batch_size=inner_batch_size,
            task_batching=mode,
        )

    assert_vmap_matches_loop(make, make_tasks(), grad_tol=1e-12)


def test_forward_reports_query_metrics_of_the_adapted_parameters_and_diagnostics():
    learner = make_reptile(
        hidden=8,
        dtype=torch.float32,
        inner_optimizer="sgd",
        inner_lr=0.4,
        adaptation_steps=10,
        task_batching="loop",
    )
    tasks = make_tasks(dtype=torch.float32, k_shot=1)
    loss, metrics = learner(tasks)
    assert set(metrics) == {"loss", "accuracy"} and loss.requires_grad
    _, metrics = learner(tasks, diagnostics=True)
    assert set(metrics) == {
        "loss",
        "accuracy",
        "support_acc_before",
        "support_acc_after",
        "update_norm",
    }
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())
    assert metrics["support_acc_after"].item() == 1.0 > metrics["support_acc_before"].item()
    # "loss" is the query loss of phi, by hand for one task.
    with torch.no_grad():
        learner.eval_adaptation_steps, learner.eval_inner_batch_size = 10, 0
        predict = learner.adapt(tasks.support_x[0], tasks.support_y[0])
        first = F.cross_entropy(predict(tasks.query_x[0]), tasks.query_y[0])
        torch.testing.assert_close(learner.evaluate(tasks)[0][0], first)
    assert abs(learner(tasks.task(0))[1]["loss"].item() - first.item()) < 1e-5


def test_evaluate_is_per_task_deterministic_leaves_the_global_rng_and_matches_adapt():
    learner = make_reptile(
        dtype=torch.float32,
        inner_lr=0.01,
        eval_adaptation_steps=6,
        eval_inner_batch_size=4,
        task_batching="loop",
    )
    tasks = make_tasks(dtype=torch.float32)
    rng = torch.get_rng_state()
    with torch.no_grad():
        losses, accs = learner.evaluate(tasks)
        alone = [learner.evaluate(tasks.task(i)) for i in range(len(tasks))]
        predict = learner.adapt(tasks.support_x[2], tasks.support_y[2])
        logits = predict(tasks.query_x[2])
    assert torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(torch.cat([loss for loss, _ in alone]), losses, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([acc for _, acc in alone]), accs, rtol=0, atol=0)
    torch.testing.assert_close(F.cross_entropy(logits, tasks.query_y[2]), losses[2])
    assert all(p.grad is None for p in learner.parameters())
    learner.eval_adaptation_steps = 0  # adaptation changes the predictions
    assert (learner.evaluate(tasks)[0] - losses).abs().max() > 1e-4


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("adaptation_steps", 0, "algorithm.adaptation_steps=0 must be at least 1"),
        ("inner_batch_size", -1, "algorithm.inner_batch_size=-1 must be at least 0"),
        ("inner_lr", 0.0, "algorithm.inner_lr=0.0 must be positive"),
        ("adam_beta1", 1.0, r"algorithm.adam_beta1=1.0 must be in \[0, 1\)"),
        ("inner_optimizer", "rmsprop", "not one of sgd, adam"),
        ("task_batching", "parallel", "not one of auto, vmap, loop"),
    ],
)
def test_impossible_settings_name_the_key_and_the_fix(key, value, message):
    with pytest.raises(MetarunError, match=message):
        Reptile(Conv4(hidden=4), n_way=5, **{key: value})


def test_linear_scheduler_anneals_the_outer_step_size_linearly_to_zero():
    cfg = compose_config("+experiment=reptile_omniglot_5w1s", "train.steps=4")
    optimizer = build(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    scheduler = build(cfg.scheduler)(optimizer)
    lrs = []
    for _ in range(
        4
    ):  # the trainer: one optimizer step and one scheduler step per meta-training step
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx(
        [1.0, 0.75, 0.5, 0.25], abs=1e-12
    )  # epsilon at steps 0..3, as the paper's code
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_short_reptile_run_learns_well_above_chance_and_anneals_epsilon_to_zero(
    make_config, tmp_path
):
    # The paper's Omniglot settings (10-shot training tasks, Adam inner loop, SGD outer step 1 -> 0),
    # 20 steps, 5 inner steps at test instead of 50. Seeds 0, 1, 2 reached 0.69, 0.69, 0.70.
    cfg = make_config(
        "+experiment=reptile_omniglot_5w1s",
        "train.steps=20",
        "train.val_every=20",
        "algorithm.eval_adaptation_steps=5",
        "eval.episodes=50",
    )
    trainer = Trainer(cfg, tmp_path)
    results = trainer.run()
    print(f"Reptile 20 steps: test accuracy {results['test_accuracy']:.3f}")
    assert results["test_accuracy"] >= 0.5
    train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if '"train"' in line]
    assert (
        train[0]["lr"] < 1.0 and train[-1]["lr"] == 0.0 == trainer.optimizer.param_groups[0]["lr"]
    )


def test_non_transductive_evaluation_scores_each_query_alone_beside_the_support_set():
    torch.manual_seed(0)
    learner = Reptile(Conv4(hidden=4), 5, eval_adaptation_steps=2, transductive=False).eval()
    support_x, support_y = torch.randn(5, 1, 28, 28), torch.arange(5)
    query_x = torch.randn(6, 1, 28, 28)
    predict = learner.adapt(support_x, support_y)
    together = predict(query_x)
    # Each query's logits depend on the support set and itself only...
    torch.testing.assert_close(predict(query_x[:2]), together[:2])
    # ...and are what the adapted network gives for that query in a batch with the support set.
    phi = learner.adapted_params(
        dict(learner.model.named_parameters()), support_x, support_y, 2, None
    )
    with_support = torch.func.functional_call(
        learner.model, phi, (torch.cat([support_x, query_x[3:4]]),)
    )
    torch.testing.assert_close(together[3], with_support[-1], rtol=1e-4, atol=1e-5)
    transductive = Reptile(Conv4(hidden=4), 5, eval_adaptation_steps=2).eval()
    transductive.load_state_dict(learner.state_dict())
    assert (transductive.adapt(support_x, support_y)(query_x) - together).abs().max() > 1e-3
