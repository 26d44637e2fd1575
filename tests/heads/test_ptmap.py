"""PTMAPHead: the feature transform by hand, the MAP loop against easyfsl's PT_MAP on the same
transformed embeddings, the Sinkhorn plan's margins and each task's own stop, batched against
looped, accuracy on ReLU-type Gaussian clusters, the YAML's defaults and its one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from easyfsl.methods import PTMAP
from easyfsl.methods.few_shot_classifier import FewShotClassifier
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from metarun.errors import MetarunError
from metarun.heads import ptmap
from metarun.heads.base import class_means
from metarun.heads.ptmap import PTMAPHead, center, power_transform, sinkhorn

N_WAY, N_QUERY, DIM = 5, 15, 32


def episodes(n_tasks, k_shot, dtype=torch.float64, spread=1.0, seed=0):
    """T tasks of ReLU-type Gaussian clusters (max(0, centre + noise), as after a ReLU backbone),
    the support in a random order per task: support [T, N*K, D], labels [T, N*K], query
    [T, N*Q, D], labels [T, N*Q]."""
    g = torch.Generator().manual_seed(seed)
    centers = spread * torch.randn(n_tasks, N_WAY, DIM, generator=g, dtype=dtype)
    support_y = torch.stack(
        [torch.randperm(N_WAY * k_shot, generator=g) % N_WAY for _ in range(n_tasks)]
    )
    query_y = torch.arange(N_WAY).repeat_interleave(N_QUERY).expand(n_tasks, -1)

    def draw(labels):
        noise = torch.randn(*labels.shape, DIM, generator=g, dtype=dtype)
        return (centers.gather(1, labels.unsqueeze(-1).expand(-1, -1, DIM)) + noise).relu()

    return draw(support_y), support_y, draw(query_y), query_y


class EasyfslPTMAPOnTransformed(PTMAP):
    """easyfsl's PT_MAP fed embeddings already transformed: its own power transform (without the
    paper's normalization and centring) left out."""

    def compute_features(self, images):
        return FewShotClassifier.compute_features(self, images)


def test_power_transform_and_centring_by_hand():
    x = torch.tensor([[[0.0, 4.0], [9.0, 0.0], [-5.0, 16.0]]], dtype=torch.float64)
    roots = [[math.sqrt(a + 1e-6) for a in row] for row in ([0, 4], [9, 0], [0, 16])]  # -5 -> 0
    unit = [[a / math.hypot(*row) for a in row] for row in roots]
    torch.testing.assert_close(power_transform(x, 0.5), torch.tensor([unit], dtype=torch.float64))
    mean = [sum(row[d] for row in unit) / 3 for d in range(2)]
    centred = [[a - m for a, m in zip(row, mean)] for row in unit]
    centred = [[a / math.hypot(*row) for a in row] for row in centred]
    expected = torch.tensor([centred], dtype=torch.float64)
    torch.testing.assert_close(center(power_transform(x, 0.5)), expected)


@pytest.mark.parametrize("k_shot", [1, 5])
def test_ptmap_matches_easyfsl_pt_map_on_the_transformed_embeddings(k_shot):
    support, support_y, query, _ = episodes(1, k_shot, spread=0.5)
    head = PTMAPHead()  # lambda 10, alpha 0.2, 20 iterations: the paper's
    got = head(support, support_y, query, N_WAY).exp()[0]
    reference = EasyfslPTMAPOnTransformed(
        nn.Identity(), fine_tuning_steps=20, fine_tuning_lr=0.2, lambda_regularization=10.0
    )
    reference.process_support_set(center(power_transform(support, 0.5))[0], support_y[0])
    expected = reference(center(power_transform(query, 0.5))[0])
    # Measured: at most 7e-12 apart (float64; easyfsl adds 1e-10 to the Sinkhorn denominators).
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    start = PTMAPHead(iterations=0)(support, support_y, query, N_WAY).exp()[0]
    assert (got - start).abs().max() > 0.05  # the MAP updates moved the assignments


def test_sinkhorn_plan_has_the_balanced_margins_and_each_task_stops_on_its_own(monkeypatch):
    g = torch.Generator().manual_seed(4)
    cost = torch.rand(4, 20, 4, generator=g, dtype=torch.float64) * torch.tensor(
        [0.1, 0.3, 1.0, 3.0], dtype=torch.float64
    ).view(4, 1, 1)
    plan = sinkhorn(cost, 10.0)
    torch.testing.assert_close(plan.sum(dim=1), torch.full((4, 4), 5.0, dtype=torch.float64))
    # The rows are as close to 1 as the loop's stopping rule leaves them: measured 2e-5.
    rows = plan.sum(dim=2)
    torch.testing.assert_close(rows, torch.ones(4, 20, dtype=torch.float64), atol=1e-4, rtol=0)

    def iterations_alone(t):
        """The iterations after which task t's plan alone no longer changes."""
        for k in range(1, 1000):
            monkeypatch.setattr(ptmap, "SINKHORN_MAX_ITERATIONS", k)
            before = sinkhorn(cost[t : t + 1], 10.0)
            monkeypatch.setattr(ptmap, "SINKHORN_MAX_ITERATIONS", k + 1)
            if torch.equal(before, sinkhorn(cost[t : t + 1], 10.0)):
                return k
        raise AssertionError("no convergence")

    counts = [iterations_alone(t) for t in range(4)]
    monkeypatch.undo()
    assert len(set(counts)) > 1  # measured: 5, 9, 23 and 149 iterations
    alone = torch.cat([sinkhorn(cost[t : t + 1], 10.0) for t in range(4)])
    torch.testing.assert_close(plan, alone, atol=0, rtol=0)


def test_ptmap_batched_equals_per_task():
    support, support_y, query, _ = episodes(4, 5, spread=0.5, seed=1)
    head = PTMAPHead()
    batched = head(support, support_y, query, N_WAY)
    looped = torch.cat(
        [head(support[t : t + 1], support_y[t : t + 1], query[t : t + 1], N_WAY) for t in range(4)]
    )
    torch.testing.assert_close(batched, looped, atol=1e-12, rtol=0)


def test_ptmap_clips_negative_entries_before_the_power_transform():
    support, support_y, query, _ = episodes(1, 1, seed=2)
    g = torch.Generator().manual_seed(5)
    negative = -torch.rand(support.shape, generator=g, dtype=torch.float64)
    head = PTMAPHead()
    with_negatives = head(torch.where(support > 0, support, negative), support_y, query, N_WAY)
    torch.testing.assert_close(with_negatives, head(support, support_y, query, N_WAY))
    assert torch.isfinite(with_negatives).all()


@pytest.mark.parametrize("k_shot", [1, 5])
def test_ptmap_predicts_gaussian_clusters_well_above_chance_and_the_class_means(k_shot):
    support, support_y, query, query_y = episodes(10, k_shot, dtype=torch.float32, spread=0.75)
    with torch.no_grad():
        log_p = PTMAPHead()(support, support_y, query, N_WAY)
    assert log_p.shape == (10, N_WAY * N_QUERY, N_WAY) and log_p.dtype == torch.float32
    p = log_p.exp()
    torch.testing.assert_close(p.sum(dim=1), torch.full((10, N_WAY), float(N_QUERY)))
    # Rows within the Sinkhorn loop's convergence: measured 2e-4 (float32).
    torch.testing.assert_close(p.sum(dim=-1), torch.ones(10, N_WAY * N_QUERY), atol=1e-3, rtol=0)
    accuracy = (log_p.argmax(dim=-1) == query_y).float().mean().item()
    s, q = center(power_transform(support, 0.5)), center(power_transform(query, 0.5))
    means = class_means(s, support_y, N_WAY)
    plain_accuracy = (torch.cdist(q, means).argmin(dim=-1) == query_y).float().mean().item()
    # chance is 0.2; measured 0.85 (class means 0.67) 1-shot, 0.97 (0.91) 5-shot
    assert accuracy > 0.75 and accuracy > plain_accuracy


def test_ptmap_leaks_no_gradient_promotes_bfloat16_and_ignores_autocast():
    support, support_y, query, _ = episodes(1, 1, dtype=torch.float32)
    support.requires_grad_()
    head = PTMAPHead()
    log_p = head(support.bfloat16(), support_y, query.bfloat16(), N_WAY)
    assert log_p.dtype == torch.float32 and not log_p.requires_grad
    expected = head(support.bfloat16().float(), support_y, query.bfloat16().float(), N_WAY)
    torch.testing.assert_close(log_p, expected, atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = head(support, support_y, query, N_WAY)
    torch.testing.assert_close(autocast, head(support, support_y, query, N_WAY), atol=0, rtol=0)


def test_ptmap_yaml_builds_the_head_with_the_papers_defaults():
    conf = OmegaConf.load(Path(__file__).parents[2] / "conf" / "head" / "ptmap.yaml")
    head = instantiate(conf)
    assert isinstance(head, PTMAPHead) and head.name == "ptmap"
    default = PTMAPHead()
    for key in conf:
        if key != "_target_":
            assert getattr(head, key) == getattr(default, key), key
    assert (head.beta, head.lambda_regularization, head.alpha, head.iterations) == (
        0.5,
        10,
        0.2,
        20,
    )


def test_ptmap_refuses_a_single_query():
    support, support_y, query, _ = episodes(1, 1)
    with pytest.raises(MetarunError, match="head=ptmap is transductive and needs at least 2"):
        PTMAPHead()(support, support_y, query[:, :1], N_WAY)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta=0.0), "head.beta=0.0 must be positive"),
        (dict(lambda_regularization=-1.0), "head.lambda_regularization=-1.0 must be positive"),
        (dict(alpha=1.5), r"head.alpha=1.5 must be in \(0, 1\]"),
        (dict(iterations=-1), "head.iterations=-1 must be at least 0"),
    ],
)
def test_ptmap_bad_hyperparameters_are_one_line_errors(kwargs, message):
    with pytest.raises(MetarunError, match=message) as error:
        PTMAPHead(**kwargs)
    assert "\n" not in str(error.value)
