"""BDCSPNHead: the rectified prototypes against easyfsl's BD_CSPN (at its eps = 1) and by hand (the
paper's eps and top Z), the head's scores against easyfsl's prototypes, batched against looped,
accuracy on Gaussian clusters, the YAML's defaults and its one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from easyfsl.methods import BDCSPN
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from metarun.errors import MetarunError
from metarun.heads.base import class_means
from metarun.heads.bdcspn import BDCSPNHead, cosine, rectified_prototypes, shift_queries

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


def easyfsl_prototypes(support, support_y, query):
    """easyfsl's rectified prototypes for one task `[N, D]`, on L2-normalized embeddings."""
    reference = BDCSPN(nn.Identity(), feature_normalization=2)
    reference.process_support_set(support, support_y)
    reference.rectify_prototypes(F.normalize(query, dim=1))
    return reference.prototypes


@pytest.mark.parametrize("k_shot", [1, 5])
def test_rectified_prototypes_match_easyfsl_bd_cspn(k_shot):
    support, support_y, query, _ = episodes(1, k_shot)
    s, q = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
    # easyfsl's weights are exp(cos): eps = 1, every pseudo-labelled query.
    got = rectified_prototypes(s, support_y, shift_queries(s, q), N_WAY, epsilon=1.0)[0]
    expected = easyfsl_prototypes(support[0], support_y[0], query[0])
    # Measured: at most 1e-16 apart (float64).
    torch.testing.assert_close(got, expected, atol=1e-14, rtol=0)
    means = torch.stack([s[0][support_y[0] == n].mean(0) for n in range(N_WAY)])
    assert (got - means).abs().max() > 1e-2  # the queries moved the prototypes


@pytest.mark.parametrize("k_shot", [1, 5])
def test_bdcspn_head_scores_the_shifted_queries_against_easyfsls_prototypes(k_shot):
    support, support_y, query, _ = episodes(1, k_shot, seed=1)
    logits = BDCSPNHead(epsilon=1.0)(support, support_y, query, N_WAY)[0]
    s, q = F.normalize(support[0], dim=1), F.normalize(query[0], dim=1)
    shifted = q + s.mean(0) - q.mean(0)  # the paper's xi; easyfsl scores q itself
    prototypes = easyfsl_prototypes(support[0], support_y[0], query[0])
    expected = F.normalize(shifted, dim=1) @ F.normalize(prototypes, dim=1).T
    torch.testing.assert_close(logits, expected, atol=1e-14, rtol=0)


def test_rectification_with_the_papers_epsilon_and_top_z_by_hand():
    # 2-way 1-shot in 2-D: P_0 = (1, 0), P_1 = (0, 1). The queries (2, 1) and (3, 1) are nearer P_0
    # in cosine (2/sqrt 5 and 3/sqrt 10), (0, 2) is P_1's (cosine 1).
    support = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    support_y = torch.tensor([[0, 1]])
    query = torch.tensor([[[2.0, 1.0], [3.0, 1.0], [0.0, 2.0]]], dtype=torch.float64)
    c1, c2 = 2 / math.sqrt(5), 3 / math.sqrt(10)
    w = [math.exp(10 * c) for c in (1.0, c1, c2)]
    p0 = [(w[0] * 1 + w[1] * 2 + w[2] * 3) / sum(w), (w[1] * 1 + w[2] * 1) / sum(w)]
    p1 = [0.0, (1 + 2) / 2]  # equal cosines, equal weights
    expected = torch.tensor([[p0, p1]], dtype=torch.float64)
    got = rectified_prototypes(support, support_y, query, 2, epsilon=10.0)
    torch.testing.assert_close(got, expected, atol=1e-14, rtol=0)
    # Z = 1: class 0 takes only its most similar query, (3, 1).
    w = [math.exp(10 * c) for c in (1.0, c2)]
    p0 = [(w[0] * 1 + w[1] * 3) / sum(w), w[1] / sum(w)]
    expected = torch.tensor([[p0, p1]], dtype=torch.float64)
    got = rectified_prototypes(support, support_y, query, 2, epsilon=10.0, top_z=1)
    torch.testing.assert_close(got, expected, atol=1e-14, rtol=0)


@pytest.mark.parametrize("top_z", [None, 3])
def test_bdcspn_batched_equals_per_task(top_z):
    support, support_y, query, _ = episodes(4, 5, seed=2)
    head = BDCSPNHead(top_z=top_z)
    batched = head(support, support_y, query, N_WAY)
    looped = torch.cat(
        [head(support[t : t + 1], support_y[t : t + 1], query[t : t + 1], N_WAY) for t in range(4)]
    )
    torch.testing.assert_close(batched, looped, atol=1e-13, rtol=0)


@pytest.mark.parametrize("k_shot", [1, 5])
def test_bdcspn_predicts_gaussian_clusters_well_above_chance_and_the_class_means(k_shot):
    support, support_y, query, query_y = episodes(10, k_shot, dtype=torch.float32, spread=0.75)
    with torch.no_grad():
        logits = BDCSPNHead()(support, support_y, query, N_WAY)
    assert logits.shape == (10, N_WAY * N_QUERY, N_WAY) and logits.dtype == torch.float32
    assert logits.abs().max() <= 10.0 + 1e-5  # eps times a cosine
    accuracy = (logits.argmax(dim=-1) == query_y).float().mean().item()
    means = class_means(F.normalize(support, dim=-1), support_y, N_WAY)
    plain = cosine(query, means).argmax(dim=-1)  # the cosine classifier before rectification
    plain_accuracy = (plain == query_y).float().mean().item()
    # chance is 0.2; measured 0.77 (plain 0.75) 1-shot, 0.97 (plain 0.95) 5-shot
    assert accuracy > 0.7 and accuracy > plain_accuracy


def test_bdcspn_leaks_no_gradient_promotes_bfloat16_and_ignores_autocast():
    support, support_y, query, _ = episodes(1, 1, dtype=torch.float32)
    support.requires_grad_()
    head = BDCSPNHead()
    logits = head(support.bfloat16(), support_y, query.bfloat16(), N_WAY)
    assert logits.dtype == torch.float32 and not logits.requires_grad
    expected = head(support.bfloat16().float(), support_y, query.bfloat16().float(), N_WAY)
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = head(support, support_y, query, N_WAY)
    torch.testing.assert_close(autocast, head(support, support_y, query, N_WAY), atol=0, rtol=0)


def test_bdcspn_yaml_builds_the_head_with_the_papers_defaults():
    conf = OmegaConf.load(Path(__file__).parents[2] / "conf" / "head" / "bdcspn.yaml")
    head = instantiate(conf)
    assert isinstance(head, BDCSPNHead) and head.name == "bdcspn"
    assert (head.epsilon, head.top_z) == (BDCSPNHead().epsilon, BDCSPNHead().top_z) == (10.0, None)


def test_bdcspn_refuses_a_single_query():
    support, support_y, query, _ = episodes(1, 1)
    with pytest.raises(MetarunError, match="head=bdcspn is transductive and needs at least 2"):
        BDCSPNHead()(support, support_y, query[:, :1], N_WAY)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(epsilon=0.0), "head.epsilon=0.0 must be positive"),
        (dict(top_z=0), "head.top_z=0 must be at least 1"),
    ],
)
def test_bdcspn_bad_hyperparameters_are_one_line_errors(kwargs, message):
    with pytest.raises(MetarunError, match=message) as error:
        BDCSPNHead(**kwargs)
    assert "\n" not in str(error.value)
