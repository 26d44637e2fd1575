"""LaplacianShotHead against easyfsl's LaplacianShot (at its eps = 1), the kNN affinity and the
unregularized case by hand, each task stopping at its own iteration, accuracy on Gaussian clusters,
the YAML's defaults and its one-line errors."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from easyfsl.methods import LaplacianShot
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from metarun.errors import MetarunError
from metarun.heads import laplacianshot
from metarun.heads.laplacianshot import LaplacianShotHead, knn_affinity

N_WAY, N_QUERY, DIM = 5, 15, 32


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


@contextmanager
def default_dtype(dtype):
    """easyfsl builds its affinity matrix in the default dtype: float64 for a float64 comparison."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("k_shot", [1, 5])
@pytest.mark.parametrize("rectify", [True, False])
def test_laplacianshot_matches_easyfsl_laplacian_shot(k_shot, rectify):
    support, support_y, query, _ = episodes(1, k_shot, spread=0.7)
    reference = LaplacianShot(
        nn.Identity(), feature_normalization=2, inference_steps=20, knn=3, lambda_regularization=0.7
    )
    if not rectify:  # easyfsl always rectifies: keep its class means
        reference.rectify_prototypes = lambda query_features: None
    reference.process_support_set(support[0], support_y[0])
    with default_dtype(torch.float64):
        expected = reference(query[0])  # the soft assignments
    # easyfsl's rectification weights are exp(cos): eps = 1.
    head = LaplacianShotHead(epsilon=1.0, prototype_rectification=rectify)
    got = head(support, support_y, query, N_WAY).exp()[0]
    # Measured: at most 3e-16 apart (float64).
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    start = (-(torch.cdist(F.normalize(query[0], dim=1), reference.prototypes) ** 2)).softmax(dim=1)
    assert (got - start).abs().max() > 0.05  # the Laplacian term moved the assignments


def test_knn_affinity_by_hand():
    # Points on a line at 0, 1, 3, 7: each one's two nearest others.
    query = torch.tensor([[[0.0], [1.0], [3.0], [7.0]]])
    expected = torch.tensor(
        [[[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]]], dtype=torch.float32
    )
    torch.testing.assert_close(knn_affinity(query, knn=3), expected)


def test_without_the_laplacian_term_the_assignments_are_the_softmax_of_minus_the_distances():
    support, support_y, query, _ = episodes(2, 5)
    head = LaplacianShotHead(lambda_regularization=0.0, prototype_rectification=False)
    s, q = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
    means = torch.stack(
        [torch.stack([s[t][support_y[t] == n].mean(0) for n in range(N_WAY)]) for t in range(2)]
    )
    expected = (-(torch.cdist(q, means) ** 2)).log_softmax(dim=-1)
    torch.testing.assert_close(head(support, support_y, query, N_WAY), expected)


def test_laplacianshot_batched_equals_per_task_where_tasks_stop_at_different_iterations(
    monkeypatch,
):
    support, support_y, query, _ = episodes(4, 1, spread=0.5, seed=3)
    head = LaplacianShotHead(iterations=100)
    alone, updates = [], []
    bound = laplacianshot.bound
    for t in range(4):
        calls = []
        monkeypatch.setattr(
            laplacianshot, "bound", lambda *a, calls=calls: calls.append(1) or bound(*a)
        )
        alone.append(head(support[t : t + 1], support_y[t : t + 1], query[t : t + 1], N_WAY))
        updates.append(len(calls))
    monkeypatch.setattr(laplacianshot, "bound", bound)
    # Measured: 13, 13, 15 and 13 updates.
    assert len(set(updates)) > 1 and max(updates) < 100  # each converged, at its own update
    batched = head(support, support_y, query, N_WAY)
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-12, rtol=0)


@pytest.mark.parametrize("k_shot", [1, 5])
def test_laplacianshot_predicts_gaussian_clusters_well_above_chance(k_shot):
    support, support_y, query, query_y = episodes(10, k_shot, dtype=torch.float32, spread=0.75)
    with torch.no_grad():
        log_p = LaplacianShotHead()(support, support_y, query, N_WAY)
    assert log_p.shape == (10, N_WAY * N_QUERY, N_WAY) and log_p.dtype == torch.float32
    torch.testing.assert_close(log_p.exp().sum(dim=-1), torch.ones(10, N_WAY * N_QUERY))
    accuracy = (log_p.argmax(dim=-1) == query_y).float().mean().item()
    assert accuracy > 0.7  # chance is 0.2; measured 0.81 (1-shot), 0.95 (5-shot)


def test_laplacianshot_leaks_no_gradient_promotes_bfloat16_and_ignores_autocast():
    support, support_y, query, _ = episodes(1, 1, dtype=torch.float32)
    support.requires_grad_()
    head = LaplacianShotHead()
    log_p = head(support.bfloat16(), support_y, query.bfloat16(), N_WAY)
    assert log_p.dtype == torch.float32 and not log_p.requires_grad
    expected = head(support.bfloat16().float(), support_y, query.bfloat16().float(), N_WAY)
    torch.testing.assert_close(log_p, expected, atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = head(support, support_y, query, N_WAY)
    torch.testing.assert_close(autocast, head(support, support_y, query, N_WAY), atol=0, rtol=0)


def test_laplacianshot_yaml_builds_the_head_with_the_papers_defaults():
    conf = OmegaConf.load(Path(__file__).parents[2] / "conf" / "head" / "laplacianshot.yaml")
    head = instantiate(conf)
    assert isinstance(head, LaplacianShotHead) and head.name == "laplacianshot"
    default = LaplacianShotHead()
    for key in conf:
        if key != "_target_":
            assert getattr(head, key) == getattr(default, key), key
    assert (head.knn, head.lambda_regularization, head.iterations) == (3, 0.7, 20)


def test_laplacianshot_refuses_a_single_query_and_fewer_queries_than_knn():
    support, support_y, query, _ = episodes(1, 1)
    with pytest.raises(MetarunError, match="head=laplacianshot is transductive and needs at least"):
        LaplacianShotHead()(support, support_y, query[:, :1], N_WAY)
    with pytest.raises(
        MetarunError, match="head.knn=5 needs at least 5 queries per task but got 4"
    ):
        LaplacianShotHead(knn=5)(support, support_y, query[:, :4], N_WAY)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(knn=1), "head.knn=1 must be at least 2"),
        (dict(iterations=-1), "head.iterations=-1 must be at least 0"),
        (dict(lambda_regularization=-1.0), "head.lambda_regularization=-1.0 must be at least 0"),
        (dict(epsilon=0.0), "head.epsilon=0.0 must be positive"),
    ],
)
def test_laplacianshot_bad_hyperparameters_are_one_line_errors(kwargs, message):
    with pytest.raises(MetarunError, match=message) as error:
        LaplacianShotHead(**kwargs)
    assert "\n" not in str(error.value)
