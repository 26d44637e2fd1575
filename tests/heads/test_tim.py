"""TIMHead against easyfsl's TIM (its cosine classifier as it is, the paper's l2 classifier put in
its loop), batched against looped, no gradients leaking, accuracy on Gaussian clusters, the YAML's
defaults and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from easyfsl.methods import TIM
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from metarun.errors import MetarunError
from metarun.heads.tim import TIMHead

N_WAY, N_QUERY, DIM = 5, 15, 32
# The paper's weights and temperature; the paper's lr 1e-4 barely moves the prototypes in a few
# steps, so the comparisons also run with a budget that moves the predictions far from the init.
PAPER = dict(
    temperature=15.0,
    cross_entropy_weight=0.1,
    marginal_entropy_weight=1.0,
    conditional_entropy_weight=0.1,
)
BUDGETS = {"paper_lr": dict(iterations=50, lr=1e-4), "moving": dict(iterations=40, lr=1e-2)}


def episodes(n_tasks, k_shot, dtype=torch.float64, spread=1.0, seed=0):
    """T tasks of Gaussian clusters, the support in a random order per task: support [T, N*K, D],
    labels [T, N*K], query [T, N*Q, D], labels [T, N*Q]."""
    g = torch.Generator().manual_seed(seed)
    centers = spread * torch.randn(n_tasks, N_WAY, DIM, generator=g, dtype=dtype)
    support_y = torch.stack(
        [torch.randperm(N_WAY * k_shot, generator=g) % N_WAY for _ in range(n_tasks)]
    )
    query_y = torch.arange(N_WAY).repeat_interleave(N_QUERY).expand(n_tasks, -1)

    def draw(labels):
        noise = torch.randn(*labels.shape, DIM, generator=g, dtype=dtype)
        return centers.gather(1, labels.unsqueeze(-1).expand(-1, -1, DIM)) + noise

    return draw(support_y), support_y, draw(query_y), query_y


class EasyfslTIMWithL2Logits(TIM):
    """easyfsl's TIM loop with the paper's classifier, -1/2 ||z - w_n||^2, in place of the cosine
    (TIM multiplies it by the temperature)."""

    def cosine_distance_to_prototypes(self, samples):
        return -0.5 * torch.cdist(samples, self.prototypes).square()


@pytest.mark.parametrize("k_shot", [1, 5])
@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize(
    "classifier, reference_class", [("cosine", TIM), ("l2", EasyfslTIMWithL2Logits)]
)
def test_tim_matches_easyfsl_tim(k_shot, budget, classifier, reference_class):
    support, support_y, query, _ = episodes(1, k_shot)
    steps, lr = BUDGETS[budget]["iterations"], BUDGETS[budget]["lr"]
    # feature_normalization=2: the L2 normalization the paper's TIM applies first.
    reference = reference_class(
        nn.Identity(),
        use_softmax=True,
        feature_normalization=2,
        fine_tuning_steps=steps,
        fine_tuning_lr=lr,
        **PAPER,
    )
    reference.process_support_set(support[0], support_y[0])
    expected = reference(query[0])  # softmax(tau * scores)
    head = TIMHead(classifier=classifier, **BUDGETS[budget], **PAPER)
    got = head(support, support_y, query, N_WAY).softmax(dim=-1)[0]
    # Measured: at most 2e-15 apart (float64).
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    if budget == "moving":  # the fitting moved the predictions: the check is not of the init alone
        init = TIMHead(classifier=classifier, iterations=0, **PAPER)
        start = init(support, support_y, query, N_WAY).softmax(dim=-1)[0]
        assert (got - start).abs().max() > 0.05


def test_tim_batched_equals_per_task():
    support, support_y, query, _ = episodes(4, 5, seed=1)
    head = TIMHead(**BUDGETS["moving"])
    batched = head(support, support_y, query, N_WAY)
    looped = torch.cat(
        [head(support[t : t + 1], support_y[t : t + 1], query[t : t + 1], N_WAY) for t in range(4)]
    )
    torch.testing.assert_close(batched, looped, atol=1e-12, rtol=0)


def test_tim_fits_under_no_grad_and_leaks_no_gradient():
    support, support_y, query, _ = episodes(1, 1)
    support.requires_grad_()
    query.requires_grad_()
    head = TIMHead(**BUDGETS["moving"])
    with torch.no_grad():
        quiet = head(support, support_y, query, N_WAY)
    loud = head(support, support_y, query, N_WAY)
    assert not loud.requires_grad and support.grad is None and query.grad is None
    torch.testing.assert_close(quiet, loud, atol=0, rtol=0)
    init = TIMHead(iterations=0)(support, support_y, query, N_WAY)
    assert (quiet.softmax(-1) - init.softmax(-1)).abs().max() > 0.05  # it did fit


@pytest.mark.parametrize("k_shot", [1, 5])
def test_tim_predicts_gaussian_clusters_well_above_chance(k_shot):
    support, support_y, query, query_y = episodes(2, k_shot, dtype=torch.float32, seed=2)
    logits = TIMHead(iterations=200)(support, support_y, query, N_WAY)
    assert logits.shape == (2, N_WAY * N_QUERY, N_WAY) and logits.dtype == torch.float32
    accuracy = (logits.argmax(dim=-1) == query_y).float().mean().item()
    assert accuracy > 0.8  # chance is 0.2; measured 0.98 (1-shot), 1.00 (5-shot)


def test_tim_promotes_bfloat16_embeddings_and_ignores_autocast():
    support, support_y, query, _ = episodes(1, 1, dtype=torch.float32)
    head = TIMHead(iterations=5)
    low = head(support.bfloat16(), support_y, query.bfloat16(), N_WAY)
    assert low.dtype == torch.float32
    expected = head(support.bfloat16().float(), support_y, query.bfloat16().float(), N_WAY)
    torch.testing.assert_close(low, expected, atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = head(support, support_y, query, N_WAY)
    torch.testing.assert_close(autocast, head(support, support_y, query, N_WAY), atol=0, rtol=0)


def test_tim_yaml_builds_the_head_with_the_papers_defaults():
    conf = OmegaConf.load(Path(__file__).parents[2] / "conf" / "head" / "tim.yaml")
    head = instantiate(conf)
    assert isinstance(head, TIMHead) and head.name == "tim"
    default = TIMHead()
    for key in conf:
        if key != "_target_":
            assert getattr(head, key) == getattr(default, key), key
    assert (head.temperature, head.iterations, head.lr) == (15.0, 1000, 1e-4)
    assert (head.cross_entropy_weight, head.conditional_entropy_weight) == (0.1, 0.1)


def test_tim_refuses_a_single_query():
    support, support_y, query, _ = episodes(1, 1)
    with pytest.raises(MetarunError, match="head=tim is transductive and needs at least 2"):
        TIMHead()(support, support_y, query[:, :1], N_WAY)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(classifier="dot"), "head.classifier='dot' is not one of l2, cosine"),
        (dict(iterations=-1), "head.iterations=-1 must be at least 0"),
        (dict(lr=0.0), "head.lr=0.0 must be positive"),
        (dict(temperature=-1.0), "head.temperature=-1.0 must be positive"),
        (dict(cross_entropy_weight=-0.1), "head.cross_entropy_weight=-0.1 must be at least 0"),
    ],
)
def test_tim_bad_hyperparameters_are_one_line_errors(kwargs, message):
    with pytest.raises(MetarunError, match=message) as error:
        TIMHead(**kwargs)
    assert "\n" not in str(error.value)
