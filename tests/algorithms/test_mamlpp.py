"""MAML++'s options of MAML (Antoniou, Edwards & Storkey, 2019) and the choice of adapted parameters
(all: MAML, head: ANIL, body: BOIL), each against a hand computation, finite differences or the
existing code path."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.anil import ANIL
from metarun.algorithms.maml import MAML, lslr_key, msl_weights
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from metarun.models.layers import TaskBatchNorm, commit_running_statistics
from metarun.trainer import Trainer
from tests.algorithms.synthetic import (
    assert_vmap_matches_loop,
    max_abs_diff,
    meta_gradient,
    perturb_batch_norm,
    random_tasks,
)
from tests.algorithms.test_maml import reference_logits, reference_meta_loss

F64 = torch.float64
SMALL = dict(hidden=3, layers=2, image_size=8)  # finite differences need few parameters
make_tasks = partial(random_tasks, shuffled=False)
HEAD = ("model.head.weight", "model.head.bias")


def make_maml(hidden=4, layers=4, image_size=28, batch_norm="task", seed=0, **kwargs) -> MAML:
    torch.manual_seed(seed)
    backbone = Conv4(hidden=hidden, layers=layers, image_size=image_size, batch_norm=batch_norm)
    learner = MAML(backbone, n_way=5, task_batching="loop", **kwargs).to(F64)
    return perturb_batch_norm(learner)


def finite_difference_errors(learner, tasks, names, per_tensor=3, eps=1e-6) -> float:
    """The largest |central difference - meta-gradient| over the first `per_tensor` coordinates of
    each named parameter of the learner."""
    _, grads, _ = meta_gradient(learner, tasks)
    by_name = dict(zip([n for n, _ in learner.named_parameters()], grads))
    params = dict(learner.named_parameters())
    worst = 0.0
    with torch.no_grad():
        for name in names:
            flat = params[name].view(-1)
            for j in range(min(per_tensor, flat.numel())):
                flat[j] += eps
                up = learner(tasks)[0].item()
                flat[j] -= 2 * eps
                down = learner(tasks)[0].item()
                flat[j] += eps
                worst = max(worst, abs((up - down) / (2 * eps) - by_name[name].view(-1)[j].item()))
    return worst


# -- every option off ------------------------------------------------------------------------------
def test_maml_with_every_option_off_is_the_existing_maml():
    off = dict(inner_params="all", msl_steps=0, lslr=False, per_step_bn=False, first_order_until=0)
    tasks = make_tasks(dtype=F64)
    learner = make_maml(**off, adaptation_steps=2)
    learner.set_progress(123)  # no option follows the progress
    loss, grads, _ = meta_gradient(learner, tasks)
    ref_loss, ref_grads = reference_meta_loss(learner, tasks, layers=4, steps=2, first_order=False)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert max_abs_diff(grads, ref_grads) < 1e-10
    # ... and bit for bit what MAML built without the new arguments computes.
    plain_loss, plain_grads, _ = meta_gradient(make_maml(adaptation_steps=2), tasks)
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


# -- multi-step loss -------------------------------------------------------------------------------
def test_msl_weights_are_the_papers_importance_vector():
    # S = 5 steps annealed over 5000 training steps (the paper: 10 epochs of 500 iterations).
    assert msl_weights(5, 0, 5000) == pytest.approx([0.2] * 5)
    # Halfway: the first four lose half of 1/S, the last gains four times that.
    assert msl_weights(5, 2500, 5000) == pytest.approx([0.1] * 4 + [0.6])
    # Near the end the first four sit at their floor 0.03/S, the last at 1 - 4 * 0.03/S.
    assert msl_weights(5, 4999, 5000) == pytest.approx([0.006] * 4 + [0.976])
    # The reference's epoch e of 10 is training step 500 e here: 1/S - e/(10 S) for the first
    # four, 1/S + 4 e/(10 S) for the last (e = 3).
    assert msl_weights(5, 1500, 5000) == pytest.approx([0.2 - 0.06] * 4 + [0.2 + 4 * 0.06])
    for progress in (0, 1234, 4999):
        assert sum(msl_weights(5, progress, 5000)) == pytest.approx(1.0)
    assert msl_weights(5, 5000, 5000) is None  # annealed: only the last step's loss
    assert msl_weights(5, 0, 0) is None  # off


def reference_msl_loss(learner, tasks, steps, weights):
    """Unrolled MAML, the query loss after every inner step weighted by `weights` and summed."""
    names, params = zip(*learner.named_parameters())
    losses = []
    for t in range(len(tasks)):
        fast, task_loss = list(params), 0.0
        for s in range(steps):
            logits = reference_logits(dict(zip(names, fast)), tasks.support_x[t], layers=4)
            grads = torch.autograd.grad(
                F.cross_entropy(logits, tasks.support_y[t]), fast, create_graph=True
            )
            fast = [w - learner.inner_lr * g for w, g in zip(fast, grads)]
            query_logits = reference_logits(dict(zip(names, fast)), tasks.query_x[t], layers=4)
            task_loss = task_loss + weights[s] * F.cross_entropy(query_logits, tasks.query_y[t])
        losses.append(task_loss)
    meta_loss = torch.stack(losses).mean()
    return meta_loss, torch.autograd.grad(meta_loss, params)


@pytest.mark.parametrize("progress", [0, 400, 900])
def test_multi_step_loss_is_the_weighted_sum_of_every_steps_query_loss(progress):
    steps, tasks = 3, make_tasks(T=2, dtype=F64)
    learner = make_maml(adaptation_steps=steps, msl_steps=1000)
    learner.set_progress(progress)
    weights = msl_weights(steps, progress, 1000)
    loss, grads, _ = meta_gradient(learner, tasks)
    ref_loss, ref_grads = reference_msl_loss(learner, tasks, steps, weights)
    print(
        f"MSL at step {progress}, weights {weights}: max abs grad diff {max_abs_diff(grads, ref_grads):.1e}"
    )
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert max_abs_diff(grads, ref_grads) < 1e-10
    # It differs from the last step's loss alone until annealed, then is that loss.
    final_only, _ = reference_meta_loss(learner, tasks, layers=4, steps=steps, first_order=False)
    assert abs(loss.item() - final_only.item()) > 1e-4
    learner.set_progress(1000)
    assert abs(learner(tasks)[0].item() - final_only.item()) < 1e-12


# -- LSLR ------------------------------------------------------------------------------------------
def test_lslr_starts_as_maml_with_one_rate_per_tensor_and_step():
    tasks = make_tasks(dtype=F64)
    learner = make_maml(adaptation_steps=3, lslr=True, inner_lr=0.25)  # exact in float32
    assert set(learner.inner_lrs) == {lslr_key(n) for n, _ in learner.model.named_parameters()}
    assert all(r.shape == (3,) and (r == 0.25).all() for r in learner.inner_lrs.values())
    plain = make_maml(adaptation_steps=3, inner_lr=0.25)
    assert abs(learner(tasks)[0].item() - plain(tasks)[0].item()) < 1e-12


def test_lslr_meta_gradient_matches_finite_differences():
    learner = make_maml(**SMALL, adaptation_steps=2, lslr=True, inner_lr=0.5)
    with torch.no_grad():  # rates that differ by layer and step
        for rates in learner.inner_lrs.values():
            rates.add_(0.2 * torch.rand_like(rates))
    tasks = make_tasks(T=2, image_size=8, dtype=F64)
    rate_names = [n for n, _ in learner.named_parameters() if n.startswith("inner_lrs.")]
    worst = finite_difference_errors(
        learner, tasks, rate_names + ["model.backbone.blocks.0.conv.weight", *HEAD]
    )
    print(f"LSLR vs central finite differences: max abs diff {worst:.2e}")
    assert worst < 1e-7
    _, grads, _ = meta_gradient(learner, tasks)
    by_name = dict(zip([n for n, _ in learner.named_parameters()], grads))
    assert all(by_name[n].abs().min() > 0 for n in rate_names)  # every step's rate learns


# -- per-step batch norm ---------------------------------------------------------------------------
def test_per_step_batch_norm_has_a_row_per_step_that_the_inner_loop_leaves_alone():
    learner = make_maml(adaptation_steps=3, per_step_bn=True)
    norms = [m for m in learner.modules() if isinstance(m, TaskBatchNorm)]
    assert norms and all(n.weight.shape == n.bias.shape == (3, 4) for n in norms)
    tasks = make_tasks(dtype=F64)
    params = dict(learner.model.named_parameters())
    adapted = learner.adapted_params(params, tasks.support_x[0], tasks.support_y[0], 3, False)
    for name, p in params.items():
        if ".norm." in name:
            assert adapted[name] is p  # outer-loop parameters only
        else:
            assert (adapted[name] - p).abs().max() > 1e-6


def test_per_step_batch_norm_meta_gradient_matches_finite_differences():
    learner = make_maml(**SMALL, adaptation_steps=2, per_step_bn=True, inner_lr=0.5)
    perturb_batch_norm(learner)  # rows that differ by step
    tasks = make_tasks(T=2, image_size=8, dtype=F64)
    norm_names = [n for n, _ in learner.named_parameters() if ".norm." in n]
    worst = finite_difference_errors(
        learner, tasks, norm_names + ["model.backbone.blocks.1.conv.weight"]
    )
    print(f"per-step batch norm vs central finite differences: max abs diff {worst:.2e}")
    assert worst < 1e-7
    # Each row is used: step 0's by the first support pass, step 1's by the second and the queries.
    _, grads, _ = meta_gradient(learner, tasks)
    by_name = dict(zip([n for n, _ in learner.named_parameters()], grads))
    assert all((by_name[n].abs().sum(dim=1) > 0).all() for n in norm_names)


def test_per_step_running_statistics_move_by_row():
    learner = make_maml(adaptation_steps=2, per_step_bn=True, batch_norm="running")
    norm = next(m for m in learner.modules() if isinstance(m, TaskBatchNorm))
    assert norm.running_mean.shape == (2, 4)
    learner(make_tasks(dtype=F64))[0].backward()
    commit_running_statistics(learner)
    moved = (norm.running_mean != 0).any(dim=1)
    assert moved.all()  # both steps' rows recorded statistics
    assert (norm.running_mean[0] - norm.running_mean[1]).abs().max() > 1e-6  # and not the same ones
    # Evaluation normalizes by the running statistics: deterministic and per task.
    learner.eval()
    tasks = make_tasks(T=2, dtype=F64)
    with torch.no_grad():
        both = learner.evaluate(tasks)[0]
        alone = torch.cat([learner.evaluate(tasks.task(i))[0] for i in range(2)])
    torch.testing.assert_close(both, alone)


def test_per_step_batch_norm_vmap_matches_loop_and_running_statistics_refuse_vmap():
    def make(mode):
        torch.manual_seed(0)
        model = Conv4(**SMALL)
        learner = MAML(model, 5, adaptation_steps=2, per_step_bn=True, task_batching=mode)
        return perturb_batch_norm(learner.to(F64))

    assert_vmap_matches_loop(make, make_tasks(image_size=8, dtype=F64))
    with pytest.raises(MetarunError, match="algorithm.task_batching=loop") as error:
        MAML(Conv4(**SMALL, batch_norm="running"), 5, per_step_bn=True, task_batching="vmap")
    assert "\n" not in str(error.value)


# -- derivative-order annealing --------------------------------------------------------------------
def test_first_order_until_switches_to_second_order_at_the_stated_step():
    tasks = make_tasks(dtype=F64)
    learner = make_maml(first_order_until=10)
    _, first_order, _ = meta_gradient(make_maml(first_order=True), tasks)
    _, second_order, _ = meta_gradient(make_maml(), tasks)
    assert max_abs_diff(first_order, second_order) > 1e-4
    for progress, expected in (
        (0, first_order),
        (9, first_order),
        (10, second_order),
        (11, second_order),
    ):
        learner.set_progress(progress)
        _, grads, _ = meta_gradient(learner, tasks)
        assert max_abs_diff(grads, expected) < 1e-12, progress


# -- which parameters adapt ------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, dict(adaptation_steps=3, msl_steps=100, lslr=True)])
def test_inner_params_head_is_anil_exactly(options):
    tasks = make_tasks(dtype=F64)
    results = []
    for make in (partial(MAML, inner_params="head"), ANIL):
        torch.manual_seed(0)
        learner = perturb_batch_norm(
            make(Conv4(hidden=4), 5, task_batching="loop", **options).to(F64)
        )
        learner.set_progress(30)
        results.append((*meta_gradient(learner, tasks)[:2], learner.evaluate(tasks)))
    (loss_m, grads_m, eval_m), (loss_a, grads_a, eval_a) = results
    assert torch.equal(loss_m, loss_a)
    assert all(torch.equal(a, b) for a, b in zip(grads_m, grads_a))
    assert all(torch.equal(a, b) for a, b in zip(eval_m, eval_a))


def test_inner_params_body_adapts_the_body_and_leaves_the_head_unchanged():
    learner = make_maml(adaptation_steps=2, inner_params="body")
    tasks = make_tasks(dtype=F64)
    params = dict(learner.model.named_parameters())
    adapted = learner.adapted_params(params, tasks.support_x[0], tasks.support_y[0], 2, False)
    for name, p in params.items():
        if name.startswith("head."):
            assert adapted[name] is p
        else:
            assert (adapted[name] - p).abs().max() > 1e-6, name
    # The meta-gradient is MAML's with the head's inner step left out, unrolled by hand.
    names, values = zip(*learner.named_parameters())
    body = [i for i, n in enumerate(names) if not n.startswith("model.head.")]
    losses = []
    for t in range(len(tasks)):
        fast = list(values)
        for _ in range(2):
            logits = reference_logits(dict(zip(names, fast)), tasks.support_x[t], layers=4)
            loss = F.cross_entropy(logits, tasks.support_y[t])
            grads = torch.autograd.grad(loss, [fast[i] for i in body], create_graph=True)
            for i, g in zip(body, grads):
                fast[i] = fast[i] - learner.inner_lr * g
        query = reference_logits(dict(zip(names, fast)), tasks.query_x[t], layers=4)
        losses.append(F.cross_entropy(query, tasks.query_y[t]))
    ref_grads = torch.autograd.grad(torch.stack(losses).mean(), values)
    _, grads, _ = meta_gradient(learner, tasks)
    assert max_abs_diff(grads, ref_grads) < 1e-10


def test_impossible_options_name_the_key():
    for kwargs, key in (
        (dict(inner_params="neck"), "inner_params='neck' is not one of all, head, body"),
        (dict(msl_steps=-1), "msl_steps=-1"),
        (dict(first_order_until=-5), "first_order_until=-5"),
    ):
        with pytest.raises(MetarunError, match=key):
            MAML(Conv4(hidden=4), n_way=5, **kwargs)


# -- short runs on real Omniglot -------------------------------------------------------------------
SHORT_RUN = (
    "model.hidden=16",
    "optimizer.lr=0.005",
    "episode.meta_batch_size=4",
    "episode.n_query=5",
    "train.steps=80",
    "train.val_every=40",
    "eval.episodes=100",
)
# MAML++: every option on, per-step batch norm over batch statistics as MAML++'s code computes it
# (model.batch_norm=running evaluates with running statistics: plain MAML too is at chance with
# them after so short a run, 25%). Measured: MAML++ 69.6% (about 30 s on one core), BOIL 74.5%.
MAMLPP = (
    "algorithm=maml",
    "algorithm.adaptation_steps=2",
    "algorithm.eval_adaptation_steps=2",
    "algorithm.msl_steps=40",
    "algorithm.lslr=true",
    "algorithm.per_step_bn=true",
    "algorithm.first_order_until=20",
)


@pytest.mark.parametrize("overrides", [MAMLPP, ("algorithm=boil",)], ids=["mamlpp", "boil"])
def test_short_run_learns_well_above_chance(overrides, make_config, tmp_path):
    results = Trainer(make_config(*overrides, *SHORT_RUN), tmp_path).run()
    print(f"{overrides[0]} after 80 steps: test accuracy {results['test_accuracy']:.3f}")
    assert results["test_accuracy"] >= 0.5  # chance: 0.2


def test_the_trainer_tells_the_learner_its_progress(make_config, tmp_path):
    cfg = make_config(
        "algorithm=maml",
        "model.hidden=8",
        "episode.meta_batch_size=1",
        "episode.n_query=1",
        "train.steps=3",
        "train.val_every=3",
        "eval.episodes=2",
    )
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    assert trainer.learner.progress == 2  # set before the third step
