import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.feat import FEAT, SetAttention
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from metarun.trainer import Trainer
from tests.algorithms.synthetic import random_tasks


class Flat(nn.Flatten):
    """Embeds a `[T, B, 1, 1, D]` batch of "images" as their D pixel values."""

    def __init__(self, dim: int):
        super().__init__(start_dim=-3)
        self.out_features = dim


def randomize(attention: SetAttention, seed: int = 0) -> SetAttention:
    """Every parameter random (layer norm's scale and shift too), in float64."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return attention.double()


def hand_attention(attention: SetAttention, x: Tensor) -> Tensor:
    """One set `[S, D]`, item by item: softmax_j(q_i . k_j / sqrt(D)) weights on v_j per head, the
    heads concatenated, W_o, residual, layer norm with its scale and shift."""
    S, D = x.shape
    out = []
    for i in range(S):
        heads = []
        for h in range(attention.n_heads):
            rows = slice(h * D, (h + 1) * D)
            q = attention.w_q.weight[rows] @ x[i]
            k = [attention.w_k.weight[rows] @ x[j] for j in range(S)]
            v = [attention.w_v.weight[rows] @ x[j] for j in range(S)]
            scores = torch.stack([q @ k[j] / math.sqrt(D) for j in range(S)])
            weights = torch.exp(scores) / torch.exp(scores).sum()
            heads.append(sum(weights[j] * v[j] for j in range(S)))
        y = x[i] + attention.w_o.weight @ torch.cat(heads) + attention.w_o.bias
        normed = (y - y.mean()) / torch.sqrt(y.var(unbiased=False) + attention.layer_norm.eps)
        out.append(normed * attention.layer_norm.weight + attention.layer_norm.bias)
    return torch.stack(out)


@pytest.mark.parametrize("n_heads", [1, 2])
def test_attention_equals_softmax_qk_v_plus_residual_then_layer_norm_by_hand(n_heads):
    attention = randomize(SetAttention(dim=3, n_heads=n_heads)).eval()  # eval: dropout off
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.stack([hand_attention(attention, task) for task in x])
    torch.testing.assert_close(attention(x), expected)


def test_attention_dropout_is_on_in_training_only():
    attention = SetAttention(dim=8)
    x = torch.randn(1, 5, 8)
    assert not torch.equal(attention.train()(x), attention(x))  # two dropout draws
    torch.testing.assert_close(attention.eval()(x), attention(x), rtol=0, atol=0)


def conv4_feat(**settings) -> FEAT:
    torch.manual_seed(0)
    return FEAT(Conv4(in_channels=1, hidden=8, image_size=28), n_way=5, **settings).double()


def test_logits_columns_permute_with_the_ways():
    learner = conv4_feat(temperature=4.0).eval()
    tasks = random_tasks(T=2, n_way=5, k_shot=2, queries=3)
    logits = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, 5)
    ways = torch.tensor([3, 0, 4, 1, 2])  # class n is called ways[n]
    relabelled = learner.episode_logits(tasks.support_x, ways[tasks.support_y], tasks.query_x, 5)
    torch.testing.assert_close(relabelled[..., ways], logits)
    # And the support items' order within the set does not matter.
    order = torch.randperm(10, generator=torch.Generator().manual_seed(2))
    shuffled = learner.episode_logits(
        tasks.support_x[:, order], tasks.support_y[:, order], tasks.query_x, 5
    )
    torch.testing.assert_close(shuffled, logits)


def test_a_prototype_is_adapted_to_the_other_classes_of_the_task():
    # The set-to-set function at work: changing class 4's support moves class 0's logits, which
    # a plain ProtoNet (logits from class 0's support alone) would leave as they are. Embedded
    # as their pixels, so that nothing else (batch norm over the episode) links the classes.
    learner = FEAT(Flat(8), n_way=5).double().eval()
    g = torch.Generator().manual_seed(0)
    support_x = torch.randn(1, 5, 1, 1, 8, generator=g, dtype=torch.float64)
    query_x = torch.randn(1, 10, 1, 1, 8, generator=g, dtype=torch.float64)
    support_y = torch.arange(5)[None]
    logits = learner.episode_logits(support_x, support_y, query_x, 5)
    other = support_x.clone()
    other[0, 4] = torch.randn(1, 1, 8, generator=g, dtype=torch.float64)
    changed = learner.episode_logits(other, support_y, query_x, 5)
    assert (changed[..., 0] - logits[..., 0]).abs().max() > 1e-3


def hand_task() -> TaskBatch:
    # 2 ways, 1 shot, 1 query each, labels out of order; 1x1x2 "images" embedded as their pixels.
    support = torch.tensor([[0.5, -1.0], [1.0, 2.0]], dtype=torch.float64)  # labels 1, 0
    query = torch.tensor([[0.0, 1.5], [1.0, -0.5]], dtype=torch.float64)  # labels 0, 1
    return TaskBatch(
        support.view(1, 2, 1, 1, 2),
        torch.tensor([[1, 0]]),
        query.view(1, 2, 1, 1, 2),
        torch.tensor([[0, 1]]),
        n_way=2,
    )


def hand_feat(balance: float) -> FEAT:
    learner = FEAT(Flat(2), n_way=2, temperature=2.0, temperature2=3.0, balance=balance)
    randomize(learner.attention)
    return learner.eval()  # dropout off


def test_loss_is_query_loss_plus_balance_times_the_regularizer_by_hand():
    learner = hand_feat(balance=0.5)
    attention, tasks = learner.attention, hand_task()
    support, query = tasks.support_x.view(2, 2), tasks.query_x.view(2, 2)
    # Query loss: the 1-shot prototypes (class 0, class 1) adapted as one set.
    prototypes = hand_attention(attention, support[[1, 0]])
    logits = -((query[:, None] - prototypes[None]) ** 2).sum(-1) / 2.0  # [2 queries, 2 ways]
    query_loss = F.cross_entropy(logits, tasks.query_y[0])
    # Regularizer: each class's support and query adapted as its own set, their mean the centre;
    # all four embeddings classified against the centres with temperature2.
    class0 = hand_attention(attention, torch.stack([support[1], query[0]])).mean(0)
    class1 = hand_attention(attention, torch.stack([support[0], query[1]])).mean(0)
    centres = torch.stack([class0, class1])
    everything = torch.cat([support, query])  # labels 1, 0, 0, 1
    reg_logits = -((everything[:, None] - centres[None]) ** 2).sum(-1) / 3.0
    regularizer = F.cross_entropy(reg_logits, torch.tensor([1, 0, 0, 1]))

    loss, metrics = learner(tasks)
    torch.testing.assert_close(metrics["regularizer"], regularizer)
    torch.testing.assert_close(metrics["query_loss"], query_loss)
    torch.testing.assert_close(loss, query_loss + 0.5 * regularizer)
    assert regularizer.item() > 0.05  # a term that would be missed if it were left out
    # Evaluation has no regularizer: the query loss alone.
    losses, _ = learner.evaluate(tasks)
    torch.testing.assert_close(losses, query_loss[None])


def test_balance_zero_trains_on_the_query_loss_alone():
    learner = hand_feat(balance=0.0)
    loss, metrics = learner(hand_task())
    losses, _ = learner.evaluate(hand_task())
    torch.testing.assert_close(loss, losses[0])
    assert "regularizer" not in metrics


def test_regularizer_gradient_reaches_the_attention_and_the_backbone():
    learner = conv4_feat(balance=1.0).train()
    loss, _ = learner(random_tasks(T=2, n_way=5, k_shot=1, queries=2))
    loss.backward()
    for module in (learner.attention.w_q, learner.model):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"temperature": 0.0}, "algorithm.temperature=0.0 must be positive"),
        ({"balance": -1.0}, "algorithm.balance=-1.0 must be at least 0"),
        ({"distance": "manhattan"}, "algorithm.distance='manhattan' is not one of"),
        ({"dropout": 1.0}, "algorithm.dropout=1.0 must be in"),
    ],
)
def test_bad_settings_name_the_key_and_the_fix(settings, message):
    with pytest.raises(MetarunError, match=message) as error:
        FEAT(Flat(2), n_way=5, **settings)
    assert "\n" not in str(error.value) and ";" in str(error.value)


def test_cosine_logits_are_cosines_to_the_adapted_prototypes_over_temperature():
    learner = FEAT(Flat(2), n_way=2, temperature=0.5, distance="cosine")
    randomize(learner.attention)
    learner.eval()
    tasks = hand_task()
    prototypes = hand_attention(learner.attention, tasks.support_x.view(2, 2)[[1, 0]])
    query = tasks.query_x.view(2, 2)
    expected = F.cosine_similarity(query[:, None], prototypes[None], dim=-1) / 0.5
    logits = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, 2)
    torch.testing.assert_close(logits[0], expected)


def test_short_omniglot_run_learns_well_above_chance(make_config, tmp_path):
    # Conv4 from scratch, feat_omniglot_5w1s's temperatures: 60 steps of 2 tasks reached 0.83 test
    # accuracy in about 12 s on 2 CPU cores (5-way chance: 0.2).
    cfg = make_config(
        "algorithm=feat",
        "algorithm.temperature=16.0",
        "algorithm.temperature2=16.0",
        "algorithm.balance=0.1",
        "episode.meta_batch_size=2",
        "episode.n_query=5",
        "train.steps=60",
        "train.val_every=60",
        "eval.episodes=100",
    )
    results = Trainer(cfg, tmp_path).run()
    assert results["test_accuracy"] >= 0.6, results["test_accuracy"]


def test_a_flattened_resnet12_map_is_refused_in_one_line_naming_the_fix():
    with pytest.raises(MetarunError, match="model.pool=avg") as error:
        FEAT(Flat(16000), n_way=5)
    assert "\n" not in str(error.value)


def test_lr_mul_trains_the_attention_at_its_multiple_of_the_backbones_rate(make_config, tmp_path):
    trainer = Trainer(
        make_config("algorithm=feat", "algorithm.lr_mul=10", "optimizer.lr=0.002"), tmp_path
    )
    body, attention = trainer.optimizer.param_groups
    assert body["lr"] == 0.002 and attention["lr"] == pytest.approx(0.02)
    grouped = {id(p) for group in (body, attention) for p in group["params"]}
    assert grouped == {id(p) for p in trainer.learner.parameters()}  # every parameter, once
    assert len(body["params"]) + len(attention["params"]) == len(grouped)
