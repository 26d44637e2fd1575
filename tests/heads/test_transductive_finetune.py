"""TransductiveFinetuneHead against easyfsl's TransductiveFinetuning and a per-task Adam loop,
batched against looped, the entropy term's effect, accuracy on Gaussian clusters, its one-line
errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from easyfsl.methods import TransductiveFinetuning
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from metarun.errors import MetarunError
from metarun.heads.transductive_finetune import TransductiveFinetuneHead

N_WAY, N_QUERY, DIM = 5, 15, 32
# A budget large enough that fine-tuning moves the predictions far from the init, so agreement
# with a reference checks the fine-tuning and not only the init.
MOVING = dict(fine_tuning_steps=30, fine_tuning_lr=1e-2)


def episodes(n_tasks, k_shot, dtype=torch.float64, spread=3.0, seed=0):
    """T tasks of Gaussian clusters: support [T, N*K, D], labels, query [T, N*Q, D], labels."""
    g = torch.Generator().manual_seed(seed)
    centers = spread * torch.randn(n_tasks, N_WAY, 1, DIM, generator=g, dtype=dtype)

    def draw(per_class):
        noise = torch.randn(n_tasks, N_WAY, per_class, DIM, generator=g, dtype=dtype)
        return (centers + noise).flatten(1, 2)

    support, query = draw(k_shot), draw(N_QUERY)
    support_y = torch.arange(N_WAY).repeat_interleave(k_shot).expand(n_tasks, -1)
    query_y = torch.arange(N_WAY).repeat_interleave(N_QUERY).expand(n_tasks, -1)
    return support, support_y, query, query_y


def adam_loop_reference(support, support_y, query, classifier, steps, lr, temperature, weight):
    """One task written out: support-based init, then Adam on CE(support) + weight * H(query)."""
    if classifier == "cosine":
        x_s, x_q = F.normalize(support, dim=1), F.normalize(query, dim=1)
        w = torch.stack([x_s[support_y == n].mean(0) for n in range(N_WAY)])
        w = (w / w.norm(dim=1, keepdim=True)).requires_grad_()

        def logits(x):
            return temperature * x @ w.T
    else:
        x_s, x_q = support, query
        w = torch.stack([x_s[support_y == n].mean(0) for n in range(N_WAY)]).requires_grad_()

        def logits(x):
            return -temperature * torch.cdist(x, w)

    optimizer = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        p = logits(x_q).softmax(dim=1)
        query_entropy = -(p * torch.log(p + 1e-12)).sum(dim=1).mean()
        loss = F.cross_entropy(logits(x_s), support_y) + weight * query_entropy
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return logits(x_q).softmax(dim=1).detach()


@pytest.mark.parametrize("k_shot", [1, 5])
@pytest.mark.parametrize(
    "budget",
    [dict(fine_tuning_steps=25, fine_tuning_lr=5e-5), MOVING],
    ids=["paper", "moving"],
)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_euclidean_classifier_matches_easyfsl_transductive_finetuning(
    k_shot, budget, dtype, tolerance
):
    # Clusters close enough that the softmax is not saturated: the probabilities can move.
    support, support_y, query, _ = episodes(1, k_shot, dtype=dtype, spread=0.3)
    reference = TransductiveFinetuning(nn.Identity(), use_softmax=True, temperature=1.0, **budget)
    reference.process_support_set(support[0], support_y[0])
    expected = reference(query[0])
    head = TransductiveFinetuneHead(classifier="euclidean", temperature=1.0, **budget)
    probabilities = head(support, support_y, query, N_WAY).softmax(dim=-1)[0]
    # measured: float64 4e-16, float32 2.4e-7
    assert (probabilities - expected).abs().max() < tolerance
    if (
        budget is MOVING
    ):  # the fine-tuning changed the predictions, so the agreement means something
        initial = TransductiveFinetuneHead(classifier="euclidean", fine_tuning_steps=0)
        moved = probabilities - initial(support, support_y, query, N_WAY).softmax(dim=-1)[0]
        assert moved.abs().max() > 0.1  # measured: 0.39 (1-shot), 0.24 (5-shot)


@pytest.mark.parametrize("classifier", ["cosine", "euclidean"])
@pytest.mark.parametrize("entropy_weight", [0.0, 1.0])
def test_head_matches_a_per_task_adam_loop(classifier, entropy_weight):
    """entropy_weight=0: the loop is plain support fine-tuning from the same init."""
    support, support_y, query, _ = episodes(1, 5)
    temperature = 10.0 if classifier == "cosine" else 1.0
    expected = adam_loop_reference(
        support[0], support_y[0], query[0], classifier, 30, 1e-2, temperature, entropy_weight
    )
    head = TransductiveFinetuneHead(
        classifier=classifier, temperature=temperature, entropy_weight=entropy_weight, **MOVING
    )
    probabilities = head(support, support_y, query, N_WAY).softmax(dim=-1)[0]
    assert (probabilities - expected).abs().max() < 1e-12  # measured: at most 3e-16


@pytest.mark.parametrize("classifier", ["cosine", "euclidean"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_batched_tasks_equal_each_task_alone(classifier, dtype, tolerance):
    support, support_y, query, _ = episodes(4, 5, dtype=dtype)
    head = TransductiveFinetuneHead(classifier=classifier, temperature=10.0, **MOVING)
    batched = head(support, support_y, query, N_WAY).softmax(dim=-1)
    alone = torch.cat(
        [head(support[t : t + 1], support_y[t : t + 1], query[t : t + 1], N_WAY) for t in range(4)]
    ).softmax(dim=-1)
    assert batched.dtype == dtype
    assert (batched - alone).abs().max() < tolerance


def test_entropy_term_makes_a_prediction_depend_on_the_other_queries():
    support, support_y, query, _ = episodes(1, 1, spread=1.0)
    first_half = query[:, : N_WAY * N_QUERY // 2]

    def first_half_probabilities(entropy_weight, queries):
        head = TransductiveFinetuneHead(temperature=10.0, entropy_weight=entropy_weight, **MOVING)
        return head(support, support_y, queries, N_WAY).softmax(dim=-1)[:, : first_half.shape[1]]

    # weight 0: plain support fine-tuning from the same init, blind to the queries
    inductive_all = first_half_probabilities(0.0, query)
    assert (inductive_all - first_half_probabilities(0.0, first_half)).abs().max() < 1e-12
    # weight 1: the same queries get other predictions, and depend on which others are there
    transductive_all = first_half_probabilities(1.0, query)
    assert (transductive_all - inductive_all).abs().max() > 0.05
    assert (transductive_all - first_half_probabilities(1.0, first_half)).abs().max() > 1e-3


@pytest.mark.parametrize("k_shot", [1, 5])
def test_predictions_are_well_above_chance_on_gaussian_clusters(k_shot):
    support, support_y, query, query_y = episodes(8, k_shot, dtype=torch.float32)
    logits = TransductiveFinetuneHead()(support, support_y, query, N_WAY)
    assert logits.shape == (8, N_WAY * N_QUERY, N_WAY)
    assert (logits.argmax(dim=-1) == query_y).float().mean() > 0.9  # chance: 0.2


def test_runs_under_no_grad_and_leaks_no_gradient_to_the_embeddings():
    support, support_y, query, _ = episodes(2, 1, dtype=torch.float32)
    support.requires_grad_()
    query.requires_grad_()
    head = TransductiveFinetuneHead(**MOVING)
    with torch.no_grad():
        under_no_grad = head(support, support_y, query, N_WAY)
    outside = head(support, support_y, query, N_WAY)
    assert not outside.requires_grad
    assert support.grad is None and query.grad is None
    assert (under_no_grad - outside).abs().max() < 1e-6


def test_bf16_embeddings_are_fine_tuned_in_float32():
    support, support_y, query, _ = episodes(2, 5, dtype=torch.float32)
    head = TransductiveFinetuneHead(temperature=10.0, **MOVING)
    low = head(support.bfloat16(), support_y, query.bfloat16(), N_WAY)
    full = head(support.bfloat16().float(), support_y, query.bfloat16().float(), N_WAY)
    assert low.dtype == torch.float32
    assert (low - full).abs().max() == 0


def test_one_query_is_refused_in_one_line():
    support, support_y, query, _ = episodes(1, 1)
    with pytest.raises(
        MetarunError, match=r"at least 2 queries per task but got 1; set eval\.n_query"
    ):
        TransductiveFinetuneHead()(support, support_y, query[:, :1], N_WAY)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(classifier="linear"), r"head\.classifier='linear' is not one of cosine, euclidean"),
        (dict(fine_tuning_steps=-1), r"head\.fine_tuning_steps=-1 must be at least 0"),
        (dict(fine_tuning_lr=0.0), r"head\.fine_tuning_lr=0\.0 must be positive"),
        (dict(temperature=-1.0), r"head\.temperature=-1\.0 must be positive"),
        (dict(entropy_weight=-0.5), r"head\.entropy_weight=-0\.5 must be at least 0"),
    ],
)
def test_bad_hyperparameters_are_refused_in_one_line(kwargs, message):
    with pytest.raises(MetarunError, match=message):
        TransductiveFinetuneHead(**kwargs)


def test_config_builds_the_head_with_the_paper_budget():
    config = OmegaConf.load(Path(__file__).parents[2] / "conf/head/transductive_finetune.yaml")
    head = instantiate(config)
    assert isinstance(head, TransductiveFinetuneHead)
    assert (head.classifier, head.fine_tuning_steps, head.fine_tuning_lr) == ("cosine", 25, 5e-5)
    assert (head.temperature, head.entropy_weight) == (1.0, 1.0)
