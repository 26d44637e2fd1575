"""centroid, cosine, simpleshot and finetune against hand computations and task by task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metarun.errors import MetarunError
from metarun.heads.centroid import CentroidHead
from metarun.heads.cosine import CosineHead
from metarun.heads.finetune import FinetuneHead
from metarun.heads.named import head_names, named_head
from metarun.heads.simpleshot import SimpleShotHead
from tests.heads.episodes import clustered


def with_mean(head: SimpleShotHead, mean: torch.Tensor) -> SimpleShotHead:
    head.set_base_statistics({"mean": mean})
    return head


def heads() -> dict[str, torch.nn.Module]:
    mean = torch.linspace(-1, 1, 32, dtype=torch.float64)
    return {
        "centroid": CentroidHead(),
        "centroid_scaled": CentroidHead(3.0, learn_scale=True, normalize_distance=True).double(),
        "cosine": CosineHead().double(),
        "simpleshot": with_mean(SimpleShotHead(), mean),
        "finetune": FinetuneHead(epochs=5),
        "finetune_cosine": FinetuneHead(cosine=True, epochs=5),
    }


def test_centroid_is_the_negative_squared_distance_to_the_class_means():
    support, support_y, query, _ = clustered(k_shot=3)
    logits = CentroidHead()(support, support_y, query, 5)
    for t in range(4):
        means = torch.stack([support[t][support_y[t] == n].mean(0) for n in range(5)])
        torch.testing.assert_close(logits[t], -torch.cdist(query[t], means).square())


def test_cosine_is_the_temperature_times_the_cosine_to_the_class_means():
    support, support_y, query, _ = clustered(k_shot=3)
    head = CosineHead(temperature=10.0).double()
    logits = head(support, support_y, query, 5)
    for t in range(4):
        means = torch.stack([support[t][support_y[t] == n].mean(0) for n in range(5)])
        expected = 10 * F.cosine_similarity(query[t][:, None], means[None], dim=-1)
        torch.testing.assert_close(logits[t], expected)
    logits.sum().backward()
    assert head.temperature.grad is not None and head.temperature.grad != 0


def test_simpleshot_centres_on_the_base_mean_normalizes_and_takes_the_nearest_class_mean():
    support, support_y, query, _ = clustered(k_shot=5)
    mean = torch.randn(32, dtype=torch.float64)
    logits = with_mean(SimpleShotHead(), mean)(support, support_y, query, 5)
    for t in range(4):
        cl2n = lambda x: (x - mean) / (x - mean).norm(dim=-1, keepdim=True)
        means = torch.stack([cl2n(support[t][support_y[t] == n]).mean(0) for n in range(5)])
        torch.testing.assert_close(logits[t], -torch.cdist(cl2n(query[t]), means).square())


def test_simpleshot_without_base_statistics_is_one_line():
    support, support_y, query, _ = clustered()
    with pytest.raises(MetarunError, match="needs the training classes' mean embedding"):
        SimpleShotHead()(support, support_y, query, 5)


@pytest.mark.parametrize("name", list(heads()))
def test_batched_equals_task_by_task(name):
    head = heads()[name]
    support, support_y, query, _ = clustered(k_shot=2)
    with torch.no_grad():
        batched = head(support, support_y, query, 5)
        alone = torch.cat([head(support[[t]], support_y[[t]], query[[t]], 5) for t in range(4)])
    torch.testing.assert_close(batched, alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(heads()))
def test_well_above_chance_on_clustered_embeddings(name):
    support, support_y, query, query_y = clustered(k_shot=1, spread=0.5)
    head = heads()[name]
    if isinstance(head, FinetuneHead):
        head = FinetuneHead(cosine=head.cosine)  # the paper's 100 epochs
    with torch.no_grad():
        logits = head(support, support_y, query, 5)
    assert logits.shape == (4, 75, 5)
    assert (logits.argmax(-1) == query_y).double().mean() > 0.8  # chance: 0.2


def test_every_head_config_builds_its_head_with_its_name():
    assert len(head_names()) == 13
    for name in head_names():
        head = named_head(name)
        assert head.name == name


def test_an_unknown_head_or_option_is_one_line():
    with pytest.raises(MetarunError, match="eval.head=logregg is not in conf/head/; choose one"):
        named_head("logregg")
    with pytest.raises(MetarunError, match="head=cosine does not take; its options: temperature"):
        named_head("cosine", {"temp": 3})


def test_a_transductive_head_refuses_an_episode_with_one_query():
    head = named_head("ptmap")
    support, support_y, query, _ = clustered(n_query=1, n_way=1)
    with pytest.raises(MetarunError, match="head=ptmap is transductive and needs at least 2"):
        head.check_episode(support, query)
