import math

import torch
from torch import nn

from metarun.algorithms.protonet import ProtoNet, prototypes, squared_euclidean
from metarun.data.tasks import TaskBatch


def test_prototypes_are_class_means():
    support_emb = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]])  # [1, 4, 2]
    support_y = torch.tensor([[0, 0, 1, 1]])
    expected = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    torch.testing.assert_close(prototypes(support_emb, support_y, 2), expected)


def test_squared_euclidean_by_hand():
    a = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    expected = torch.tensor([[1.0, 2.0, 8.0], [5.0, 0.0, 10.0]])
    torch.testing.assert_close(squared_euclidean(a, b), expected)


def _hand_task() -> TaskBatch:
    # 1x1x2 "images" embedded by flattening: embeddings are the pixel values.
    support_x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]).view(1, 4, 1, 1, 2)
    query_x = torch.tensor([[1.0, 1.0], [0.0, 2.0]]).view(1, 2, 1, 1, 2)
    return TaskBatch(
        support_x, torch.tensor([[0, 0, 1, 1]]), query_x, torch.tensor([[0, 1]]), n_way=2
    )


def test_protonet_loss_and_logits_match_hand_computation():
    learner = ProtoNet(nn.Flatten(start_dim=-3), n_way=2)
    tasks = _hand_task()
    # Prototypes (1, 0) and (0, 2); query (1, 1) -> distances (1, 2); query (0, 2) -> (5, 0).
    logits = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, 2)
    torch.testing.assert_close(logits, -torch.tensor([[[1.0, 2.0], [5.0, 0.0]]]))
    loss, metrics = learner(tasks)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-5))) / 2
    assert abs(loss.item() - expected) < 1e-6
    assert metrics["accuracy"].item() == 1.0
    losses, accs = learner.evaluate(tasks)
    torch.testing.assert_close(losses, torch.tensor([expected]))
    torch.testing.assert_close(accs, torch.tensor([1.0]))
    predict = learner.adapt(tasks.support_x[0], tasks.support_y[0])
    torch.testing.assert_close(predict(tasks.query_x[0]), logits[0])


def test_protonet_embeds_support_and_query_in_one_call():
    shapes = []

    class Recorder(nn.Flatten):
        def forward(self, x):
            shapes.append(tuple(x.shape))
            return super().forward(x)

    learner = ProtoNet(Recorder(start_dim=-3), n_way=2)
    learner(_hand_task())
    assert shapes == [(1, 6, 1, 1, 2)]  # [T, N*K + N*Q, C, H, W]


def test_metaoptnet_head_divides_distances_by_the_embedding_size_and_learns_a_scale():
    tasks = _hand_task()  # distances (1, 2) and (5, 0) in a 2-wide embedding, as above
    plain = ProtoNet(nn.Flatten(start_dim=-3), n_way=2)
    scaled = ProtoNet(
        nn.Flatten(start_dim=-3),
        n_way=2,
        distance_scale=3.0,
        learn_scale=True,
        normalize_distance=True,
    )
    assert not dict(plain.head.named_parameters())  # the paper's model: nothing to learn
    logits = scaled.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, 2)
    torch.testing.assert_close(
        logits, 3.0 / 2 * plain.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, 2)
    )
    scaled(tasks)[0].backward()
    assert scaled.head.distance_scale.grad is not None and scaled.head.distance_scale.grad != 0


def test_a_checkpoint_from_before_heads_loads_its_learned_scale_into_the_head():
    learner = ProtoNet(nn.Flatten(start_dim=-3), n_way=2, learn_scale=True)
    old = {"distance_scale": torch.tensor(4.5)}  # the key a learned scale had before heads
    learner.load_state_dict(old)
    assert learner.head.distance_scale.item() == 4.5
