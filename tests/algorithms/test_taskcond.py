import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.protonet import ProtoNet
from metarun.algorithms.taskcond import (
    TaskCond,
    channel_means,
    film_batch_norm_affine,
    film_penalty,
    safe_sqrt,
    task_representation,
)
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from metarun.models.layers import task_batch_norm
from metarun.models.resnet12 import ResNet12
from metarun.trainer import Trainer
from tests.algorithms.synthetic import (
    assert_vmap_matches_loop,
    max_abs_diff,
    perturb_batch_norm,
    random_tasks,
)

F64 = torch.float64


make_tasks = random_tasks


def make_taskcond(hidden=8, dtype=F64, seed=0, film_on=False, **kwargs) -> TaskCond:
    """A small learner with non-trivial batch-norm affine parameters; `film_on` moves the
    post-multipliers off 0 so that the conditioning does something."""
    torch.manual_seed(seed)
    learner = TaskCond(Conv4(hidden=hidden), n_way=5, **kwargs).to(dtype)
    perturb_batch_norm(learner.model)
    if film_on:
        with torch.no_grad():
            learner.gamma0.copy_(0.5 + torch.rand_like(learner.gamma0))
            learner.beta0.copy_(0.5 + torch.rand_like(learner.beta0))
    return learner


# -- the pure functions ----------------------------------------------------------------------------
def test_task_representation_is_mean_class_mean_and_mean_class_spread_by_hand():
    # Class 0: (0, 0), (2, 4) -> mean (1, 2), spread (1, 2); class 1: (1, 1), (1, 3) -> mean (1, 2), spread (0, 1).
    support_emb = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [2.0, 4.0], [1.0, 3.0]]], dtype=F64)
    support_y = torch.tensor([[0, 1, 0, 1]])
    expected = torch.tensor([[1.0, 2.0, 0.5, 1.5]], dtype=F64)
    torch.testing.assert_close(
        task_representation(support_emb, support_y, 2), expected, rtol=0, atol=1e-15
    )


def test_task_representation_is_invariant_to_the_order_of_the_support_items():
    learner = make_taskcond(film_on=True)
    tasks = make_tasks(k_shot=3)
    emb = learner.model(tasks.support_x)  # [T, N*K, D]
    order = torch.randperm(emb.shape[1], generator=torch.Generator().manual_seed(1))
    rep = task_representation(emb, tasks.support_y, 5)
    permuted = task_representation(emb[:, order], tasks.support_y[:, order], 5)
    diff = max_abs_diff(rep, permuted)
    print(f"task representation, permuted support: max abs diff {diff:.2e}")
    assert diff < 1e-13
    # The whole learner: the support set goes through batch norm and prototypes, both order-free.
    logits = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, 5)
    permuted_logits = learner.episode_logits(
        tasks.support_x[:, order], tasks.support_y[:, order], tasks.query_x, 5
    )
    assert max_abs_diff(logits, permuted_logits) < 1e-10


def test_channel_means_average_each_channel_over_height_and_width_by_hand():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=F64).view(2, 3, 2, 2)  # [B, C, H, W]
    expected = torch.tensor([[1.5, 5.5, 9.5], [13.5, 17.5, 21.5]], dtype=F64)
    assert torch.equal(channel_means(maps.flatten(1), 3), expected)
    one_by_one = torch.randn(4, 7, dtype=F64)  # a 7x1x1 map: its own average, bit for bit
    assert torch.equal(channel_means(one_by_one, 7), one_by_one)


def test_one_shot_spread_is_exactly_zero_with_a_finite_zero_gradient():
    support_emb = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    support_y = torch.arange(5).repeat(2, 1)
    rep = task_representation(support_emb, support_y, 5)
    assert torch.equal(rep[:, 4:], torch.zeros(2, 4, dtype=F64))
    rep[:, 4:].sum().backward()
    assert torch.equal(support_emb.grad, torch.zeros_like(support_emb))  # not NaN
    x = torch.tensor([0.0, 4.0], requires_grad=True)
    safe_sqrt(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.25]))


def test_film_folded_into_batch_norm_affine_equals_explicit_film_after_batch_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 5, generator=g, dtype=F64)
    weight, bias = torch.randn(3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    gamma, beta = (
        torch.randn(1, 3, generator=g, dtype=F64),
        torch.randn(1, 3, generator=g, dtype=F64),
    )
    # gamma * BN(x) + beta in plain operations.
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    bn = (x - mean) / torch.sqrt(var + 1e-5) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    explicit = gamma.view(1, -1, 1, 1) * bn + beta.view(1, -1, 1, 1)
    folded_weight, folded_bias = film_batch_norm_affine(weight, bias, gamma, beta)
    folded = task_batch_norm(x, 1, folded_weight[0], folded_bias[0])
    diff = max_abs_diff(folded, explicit)
    print(f"FiLM folded into batch-norm affine vs gamma * BN(x) + beta: max abs diff {diff:.2e}")
    assert diff < 1e-13


def reference_conditioned_conv4(learner: TaskCond, x: torch.Tensor, gammas, betas) -> torch.Tensor:
    """One task through Conv4 with an explicit FiLM layer after each batch norm, in plain operations."""
    p = dict(learner.model.named_parameters())
    for i, (gamma, beta) in enumerate(zip(gammas, betas)):
        x = F.conv2d(x, p[f"blocks.{i}.conv.weight"], padding=1)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-5) * p[f"blocks.{i}.norm.weight"].view(1, -1, 1, 1)
        x = x + p[f"blocks.{i}.norm.bias"].view(1, -1, 1, 1)
        x = gamma.view(1, -1, 1, 1) * x + beta.view(1, -1, 1, 1)  # FiLM
        x = F.max_pool2d(F.relu(x), 2)
    return x.flatten(1)


@pytest.mark.parametrize("task_batching", ["loop", "vmap"])
def test_conditioned_backbone_equals_conv4_with_explicit_film_layers(task_batching):
    learner = make_taskcond(film_on=True, task_batching=task_batching)
    tasks = make_tasks(k_shot=2)
    film = learner.film_params(tasks.support_x, tasks.support_y, 5)
    x = torch.cat([tasks.support_x, tasks.query_x], dim=1)
    emb = learner.conditioned_embedding(film, x)  # [T, B, D]
    # The FiLM parameters by the paper's formulas, from the TEN and the post-multipliers directly.
    rep = task_representation(learner.model(tasks.support_x), tasks.support_y, 5)
    worst = 0.0
    for t in range(len(tasks)):
        gammas = [1 + learner.gamma0[i] * learner.ten_gamma[i](rep[t]) for i in range(4)]
        betas = [learner.beta0[i] * learner.ten_beta[i](rep[t]) for i in range(4)]
        worst = max(
            worst, max_abs_diff(emb[t], reference_conditioned_conv4(learner, x[t], gammas, betas))
        )
    print(f"conditioned Conv4 ({task_batching}) vs explicit FiLM layers: max abs diff {worst:.2e}")
    assert worst < 1e-12
    assert max_abs_diff(emb, learner.model(x)) > 1e-3  # the conditioning changed something


def test_film_penalty_is_half_the_weighted_sum_of_squared_post_multipliers():
    penalty = film_penalty(torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0]), film_l2=0.01)
    torch.testing.assert_close(penalty, torch.tensor(0.01 * (1 + 4 + 9) / 2))


# -- the learner -----------------------------------------------------------------------------------
def test_conv4_on_28x28_builds_its_task_representation_from_the_flattened_1x1_map_exactly():
    learner = make_taskcond(hidden=8)
    assert learner.model.out_shape == (8, 1, 1)
    assert all(
        branch.linears[0].in_features == 2 * 8 for branch in [*learner.ten_gamma, *learner.ten_beta]
    )
    tasks = make_tasks(k_shot=2)
    expected = task_representation(learner.model(tasks.support_x), tasks.support_y, 5)
    assert torch.equal(learner.task_embedding(tasks.support_x, tasks.support_y, 5), expected)


def test_resnet12_map_is_averaged_over_height_and_width_for_the_ten_and_the_learner_trains_a_step():
    torch.manual_seed(0)
    learner = TaskCond(ResNet12(channels=[8, 8, 16, 16], image_size=84), n_way=5)
    assert learner.model.out_shape == (16, 5, 5) and learner.model.out_features == 400
    branches = [*learner.ten_gamma, *learner.ten_beta]
    assert (
        len(branches) == 2 * 16
    )  # every batch norm of the 4 blocks, one gamma and one beta branch each
    assert all(branch.linears[0].in_features == 2 * 16 for branch in branches)  # not 2 * 400
    tasks = make_tasks(T=2, k_shot=2, image_size=84, channels=3, dtype=torch.float32)
    maps = learner.model(tasks.support_x).unflatten(-1, (16, 5, 5))  # [T, N*K, C, H, W]
    torch.testing.assert_close(
        learner.task_embedding(tasks.support_x, tasks.support_y, 5),
        task_representation(maps.mean(dim=(-2, -1)), tasks.support_y, 5),
    )
    with torch.no_grad():  # post-multipliers off 0, so that the TEN is trained too
        learner.gamma0.fill_(0.5)
        learner.beta0.fill_(0.5)
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.01)
    loss, _ = learner(tasks)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in learner.parameters())
    assert all(branch.linears[0].weight.grad.abs().max() > 0 for branch in branches)
    optimizer.step()
    assert all(
        not torch.equal(p, before[name]) for name, p in learner.named_parameters() if p.grad.any()
    )
    assert not torch.equal(
        learner.ten_gamma[0].linears[0].weight, before["ten_gamma.0.linears.0.weight"]
    )
    assert torch.isfinite(learner(tasks)[0])


def test_full_width_resnet12_at_84x84_has_tens_of_millions_of_parameters_not_hundreds():
    with torch.device("meta"):  # shapes only: nothing is allocated or initialized
        learner = TaskCond(ResNet12(image_size=84), n_way=5)
    ten = sum(p.numel() for name, p in learner.named_parameters() if name.startswith("ten_"))
    backbone = sum(p.numel() for p in learner.model.parameters())
    print(f"TaskCond on ResNet-12 84x84: TEN {ten:,}, backbone {backbone:,} parameters")
    assert learner.ten_gamma[0].linears[0].in_features == 2 * 640
    assert ten == 20_819_712  # 310M from the flattened 640x5x5 map


def test_taskcond_at_initialization_gives_protonet_logits_times_metric_scale():
    learner = make_taskcond(metric_scale_init=2.5)
    tasks = make_tasks(k_shot=2)
    logits = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, 5)
    protonet = ProtoNet(learner.model, n_way=5).episode_logits(
        tasks.support_x, tasks.support_y, tasks.query_x, 5
    )
    diff = max_abs_diff(logits, 2.5 * protonet)
    print(f"TaskCond at init vs 2.5 x ProtoNet logits: max abs diff {diff:.2e}")
    assert diff < 1e-12
    loss, _ = learner(tasks)
    torch.testing.assert_close(
        loss, F.cross_entropy(2.5 * protonet.flatten(0, 1), tasks.query_y.flatten())
    )


@pytest.mark.parametrize("k_shot", [1, 3])
def test_gradients_reach_the_ten_the_post_multipliers_and_the_metric_scale(k_shot):
    tasks = make_tasks(k_shot=k_shot)
    # At initialization the post-multipliers are 0: they and alpha get gradients, the TEN exactly none.
    learner = make_taskcond()
    learner(tasks)[0].backward()
    assert learner.gamma0.grad.abs().min() > 0 and learner.beta0.grad.abs().min() > 0
    assert learner.metric_scale.grad.abs() > 0
    assert all(
        torch.equal(p.grad, torch.zeros_like(p))
        for n, p in learner.named_parameters()
        if n.startswith("ten_")
    )
    # Once the post-multipliers moved, every TEN branch learns; all gradients finite (1-shot spread).
    learner = make_taskcond(film_on=True)
    learner(tasks)[0].backward()
    for branches in (learner.ten_gamma, learner.ten_beta):
        for branch in branches:
            assert (
                branch.linears[0].weight.grad.abs().max() > 0
                and branch.linears[-1].weight.grad.abs().max() > 0
            )
    assert all(torch.isfinite(p.grad).all() for p in learner.parameters())


def test_fixed_metric_scale_gets_no_gradient_and_stays():
    learner = make_taskcond(metric_scale_init=3.0, learn_metric_scale=False)
    learner(make_tasks())[0].backward()
    assert learner.metric_scale.grad is None and learner.metric_scale.item() == 3.0


def test_loss_is_query_cross_entropy_plus_film_penalty_and_diagnostics_are_detached_scalars():
    learner = make_taskcond(film_on=True, film_l2=0.5)
    tasks = make_tasks()
    loss, metrics = learner(tasks)
    assert set(metrics) == {"loss", "accuracy"}
    query_losses, _ = learner.evaluate(tasks)
    penalty = 0.5 * (learner.gamma0.square().sum() + learner.beta0.square().sum()) / 2
    assert abs(loss.item() - (query_losses.mean() + penalty).item()) < 1e-12
    _, metrics = learner(tasks, diagnostics=True)
    assert set(metrics) == {
        "loss",
        "accuracy",
        "metric_scale",
        "film_gamma0",
        "film_beta0",
        "film_penalty",
    }
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())


def test_vmap_and_loop_task_batching_agree():
    assert_vmap_matches_loop(
        lambda mode: make_taskcond(film_on=True, task_batching=mode), make_tasks(k_shot=2)
    )


def test_evaluate_is_per_task_and_adapt_predicts_the_same_logits():
    learner = make_taskcond(film_on=True).eval()
    tasks = make_tasks(T=4, k_shot=2)
    with torch.no_grad():
        losses, accs = learner.evaluate(tasks)
        for i in range(len(tasks)):
            loss_i, acc_i = learner.evaluate(tasks.task(i))
            assert abs(loss_i.item() - losses[i].item()) < 1e-12 and acc_i.item() == accs[i].item()
        logits = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, 5)
        predict = learner.adapt(tasks.support_x[1], tasks.support_y[1])
        assert max_abs_diff(predict(tasks.query_x[1]), logits[1]) < 1e-12


def test_works_for_any_n_way():
    learner = make_taskcond(film_on=True)
    for n_way in (2, 20):
        tasks = make_tasks(T=2, n_way=n_way)
        learner.check_n_way(n_way)
        loss, metrics = learner(tasks)
        assert torch.isfinite(loss)
        assert learner.evaluate(tasks)[0].shape == (2,)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"film_l2": -0.1}, r"algorithm.film_l2=-0.1 must be at least 0"),
        ({"metric_scale_init": 0.0}, r"algorithm.metric_scale_init=0.0 must be positive"),
        ({"ten_layers": 0}, r"algorithm.ten_layers=0 must be at least 1"),
        ({"task_batching": "threads"}, r"algorithm.task_batching='threads' is not one of"),
    ],
)
def test_impossible_hyperparameters_name_the_key_and_the_fix(kwargs, message):
    with pytest.raises(MetarunError, match=message):
        TaskCond(Conv4(hidden=4), n_way=5, **kwargs)


def test_a_backbone_without_batch_norm_is_refused():
    with pytest.raises(
        MetarunError, match="has none; use a backbone built from metarun.models.layers"
    ):
        TaskCond(torch.nn.Flatten(), n_way=5)


# -- real data -------------------------------------------------------------------------------------
def test_short_omniglot_run_learns_well_above_chance(make_config, tmp_path):
    # Trained on 20-way episodes (more ways learn faster, as ProtoNet's), tested 5-way 1-shot with 5
    # queries per class; this run reached 0.76 test accuracy after 30 steps (the default seed).
    cfg = make_config(
        "algorithm=taskcond",
        "episode=20w1s",
        "episode.meta_batch_size=1",
        "episode.n_query=5",
        "eval.n_way=5",
        "train.steps=30",
        "train.val_every=30",
    )
    results = Trainer(cfg, tmp_path).run()
    assert results["test_accuracy"] >= 0.2 + 0.4
