import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.mann import (
    COSINE_EPS,
    MANN,
    LRUAController,
    controller_embedding,
    cosine_similarity,
    least_used_weights,
    lrua_read,
    lrua_write,
    previous_labels,
    update_usage,
)
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from metarun.trainer import Trainer
from tests.algorithms.synthetic import random_tasks

F64 = torch.float64


class PerItemLinear(nn.Module):
    """A backbone without batch norm: each image's embedding depends on that image alone."""

    def __init__(self, pixels: int, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.linear = nn.Linear(pixels, out_features)

    def forward(self, x):
        return torch.tanh(self.linear(x.flatten(-3)))


make_tasks = partial(random_tasks, dtype=torch.float32)  # this file's defaults


def make_mann(model=None, n_way=5, dtype=F64, seed=0, **kwargs) -> MANN:
    torch.manual_seed(seed)
    kwargs = {"controller_size": 16, "memory_slots": 8, "memory_size": 6, "read_heads": 2, **kwargs}
    return MANN(model or Conv4(hidden=4), n_way=n_way, **kwargs).to(dtype)


# -- LRUA against hand computations ---------------------------------------------------------------
def test_lrua_write_goes_to_the_zeroed_least_used_slot_then_reads_by_softmax_of_cosines():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], dtype=F64)[
        None
    ]  # [1, 4, 2]
    usage = torch.tensor([[0.5, 0.1, 0.9, 0.3]], dtype=F64)  # slot 1 is the least used
    prev_read = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]], dtype=F64)  # [1, H=1, 4]
    key = torch.tensor([[[3.0, 4.0]]], dtype=F64)  # [1, 1, 2]
    alpha = torch.zeros(1, 1, dtype=F64)  # sigmoid(0) = 0.5

    new_memory, write_weights = lrua_write(memory, key, alpha, prev_read, usage)
    # w^w = 0.5 * w^r_{t-1} + 0.5 * onehot(slot 1)
    expected_write = torch.tensor([[[0.05, 0.6, 0.15, 0.2]]], dtype=F64)
    torch.testing.assert_close(write_weights, expected_write, rtol=0, atol=1e-15)
    # Slot 1 is zeroed before the write: 0.6 * k, not [0, 1] + 0.6 * k; the others only add w^w(i) k.
    expected_memory = torch.tensor([[[1.15, 0.2], [1.8, 2.4], [1.45, 1.6], [-0.4, 0.8]]], dtype=F64)
    torch.testing.assert_close(new_memory, expected_memory, rtol=0, atol=1e-15)

    read_weights, read_vector = lrua_read(new_memory, key)
    rows = expected_memory[0].tolist()
    cosines = [(3 * a + 4 * b) / (5 * math.hypot(a, b)) for a, b in rows]
    assert cosines[1] == pytest.approx(1.0)  # the slot just written holds the key itself
    exps = [math.exp(c) for c in cosines]
    expected_read = torch.tensor([[[e / sum(exps) for e in exps]]], dtype=F64)
    diff = (read_weights - expected_read).abs().max().item()
    print(
        f"LRUA read weights vs softmax of hand cosines: max abs diff {diff:.1e} (eps {COSINE_EPS} in the norms)"
    )
    assert diff < 1e-6
    torch.testing.assert_close(read_vector, read_weights @ new_memory)

    new_usage = update_usage(usage, read_weights, write_weights, gamma=0.95)
    torch.testing.assert_close(new_usage, 0.95 * usage + read_weights[:, 0] + expected_write[:, 0])


def test_cosine_similarity_matches_torch_and_is_finite_with_its_gradient_on_zero_rows():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 2, 5, generator=g, dtype=F64)  # [B, H, W]
    memory = torch.randn(3, 7, 5, generator=g, dtype=F64)  # [B, slots, W]
    reference = F.cosine_similarity(keys.unsqueeze(-2), memory.unsqueeze(-3), dim=-1, eps=0.0)
    diff = (cosine_similarity(keys, memory) - reference).abs().max().item()
    print(f"cosine_similarity vs torch (eps 0): max abs diff {diff:.1e}")
    assert diff < 1e-5
    zero_memory = torch.zeros(1, 4, 5, dtype=F64, requires_grad=True)
    similarity = cosine_similarity(keys[:1], zero_memory)
    similarity.sum().backward()
    assert torch.equal(similarity, torch.zeros_like(similarity))
    assert torch.isfinite(zero_memory.grad).all()


def test_least_used_weights_pick_the_smallest_usages_lowest_index_on_ties():
    usage = torch.tensor([[0.3, 0.1, 0.1, 0.5], [0.0, 0.0, 0.0, 0.0]])
    weights = least_used_weights(usage, 2)  # [2, 2, 4]
    assert weights.tolist() == [[[0, 1, 0, 0], [0, 0, 1, 0]], [[1, 0, 0, 0], [0, 1, 0, 0]]]


def test_two_heads_write_to_the_first_and_second_least_used_slots_and_only_the_first_is_zeroed():
    memory = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=F64)[None]  # [1, 3, 2]
    usage = torch.tensor([[0.7, 0.2, 0.1]], dtype=F64)  # least used: slot 2, then slot 1
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=F64)  # [1, H=2, 2]
    alpha = torch.full((1, 2), -1e3, dtype=F64)  # sigmoid(alpha) = 0: pure least-used writes
    new_memory, write_weights = lrua_write(
        memory, keys, alpha, torch.zeros(1, 2, 3, dtype=F64), usage
    )
    assert write_weights.tolist() == [[[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]]
    # Slot 2 is zeroed and takes head 0's key; slot 1 keeps its content and adds head 1's key.
    assert new_memory.tolist() == [[[1.0, 2.0], [3.0, 5.0], [1.0, 0.0]]]


def test_controller_step_writes_then_reads_and_a_query_step_reads_without_writing():
    torch.manual_seed(0)
    cell = LRUAController(
        input_size=3,
        controller_size=5,
        memory_slots=4,
        memory_size=2,
        read_heads=2,
        gamma=0.95,
        key_strength=10.0,
    ).to(F64)
    empty = cell.initial_state(batch=2, device=torch.device("cpu"), dtype=F64)
    features, state = cell(torch.randn(2, 3, dtype=F64), empty)
    # Fresh memory, no previous reads: head h writes (1 - sigmoid(alpha_h)) k_h to the h-th least-used slot.
    keys = torch.tanh(cell.keys(state.h)).view(2, 2, 2)
    keep = 1 - torch.sigmoid(cell.write_gates(state.h))  # [2, H]
    torch.testing.assert_close(state.memory[:, :2], keep.unsqueeze(-1) * keys, rtol=0, atol=1e-15)
    assert torch.equal(state.memory[:, 2:], torch.zeros(2, 2, 2, dtype=F64))
    # The same step then reads the memory it wrote (M_t), cosines scaled by key_strength.
    expected = torch.softmax(10.0 * cosine_similarity(keys, state.memory), dim=-1)
    torch.testing.assert_close(state.read_weights, expected, rtol=0, atol=1e-15)
    assert (
        state.read_weights[:, 0, 0].min() > 0.5 and state.read_weights[:, 1, 1].min() > 0.5
    )  # own slot
    torch.testing.assert_close(
        features[:, 5:], (expected @ state.memory).flatten(1), rtol=0, atol=1e-15
    )
    # A query step reads the memory it is given and writes nothing.
    x = torch.randn(2, 3, 3, dtype=F64)  # [T, Q, input]
    query_state = type(state)(*(t.unsqueeze(1) for t in state))
    query_features, nothing = cell(x, query_state, write=False)
    assert nothing is None and query_features.shape == (2, 3, 9)
    query_keys = torch.tanh(cell.keys(query_features[..., :5])).view(2, 3, 2, 2)
    weights = torch.softmax(10.0 * cosine_similarity(query_keys, state.memory.unsqueeze(1)), dim=-1)
    torch.testing.assert_close(
        query_features[..., 5:],
        (weights @ state.memory.unsqueeze(1)).flatten(-2),
        rtol=0,
        atol=1e-15,
    )


def test_controller_embedding_is_centred_and_unit_length():
    emb = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=F64)
    out = controller_embedding(emb)
    centred = emb - 3.0
    torch.testing.assert_close(
        out, centred / centred.norm(), rtol=0, atol=1e-5
    )  # layer norm eps 1e-5
    assert abs(out.norm().item() - 1) < 1e-5


# -- the episode as a sequence ---------------------------------------------------------------------
def test_previous_labels_are_the_one_hot_label_of_the_item_before_and_zero_first():
    labels = torch.tensor([[2, 0, 1]])
    expected = torch.tensor([[[0, 0, 0], [0, 0, 1], [1, 0, 0]]], dtype=torch.float32)
    assert torch.equal(previous_labels(labels, 3, torch.float32), expected)


class ItemIdentity(nn.Module):
    """Embeds an image as the one-hot of its first pixel (an item id), so the controller input
    names the item presented (still readable after the centring and scaling of the embedding)."""

    out_features = 16

    def forward(self, x):
        return F.one_hot(x.flatten(-3)[..., 0].long(), self.out_features).to(x.dtype)


@pytest.mark.parametrize("training", [True, False])
def test_controller_label_input_at_each_step_is_the_label_of_the_item_presented_before(training):
    n_way, k_shot, queries, T = 4, 2, 3, 3
    tasks = make_tasks(T=T, n_way=n_way, k_shot=k_shot, queries=queries, image_size=2, dtype=F64)
    # Item ids 1..S in the first pixel of support images, 0 for queries.
    ids = torch.arange(1, n_way * k_shot + 1, dtype=F64).repeat(T, 1)  # [T, S]
    tasks.support_x[..., 0, 0, 0] = ids
    tasks.query_x[..., 0, 0, 0] = 0.0
    learner = make_mann(ItemIdentity(), n_way=n_way)
    learner.train(training)
    inputs = []
    learner.memory.controller.register_forward_pre_hook(
        lambda module, args: inputs.append(args[0].detach().clone())
    )
    learner(tasks)
    support_steps, query_step = inputs[:-1], inputs[-1].view(T, queries * n_way, -1)
    assert len(support_steps) == n_way * k_shot
    item_ids = lambda step: step[..., : ItemIdentity.out_features].argmax(-1)
    presented = (
        torch.stack([item_ids(step) for step in support_steps], dim=1) - 1
    )  # [T, S] item indices
    assert all(sorted(row) == list(range(n_way * k_shot)) for row in presented.tolist())
    labels = tasks.support_y.gather(1, presented)  # [T, S] in presentation order
    d = ItemIdentity.out_features
    label_inputs = torch.stack(
        [step[:, d : d + n_way] for step in support_steps], dim=1
    )  # [T, S, N]
    assert torch.equal(label_inputs[:, 0], torch.zeros(T, n_way, dtype=F64))
    assert torch.equal(label_inputs[:, 1:], F.one_hot(labels[:, :-1], n_way).to(F64))
    # Every query gets the last support item's label, and its own image.
    last = F.one_hot(labels[:, -1:], n_way).to(F64).expand(-1, queries * n_way, -1)
    assert torch.equal(query_step[..., d : d + n_way], last)
    assert torch.equal(item_ids(query_step), torch.zeros(T, queries * n_way, dtype=torch.long))


def test_training_order_is_random_and_evaluation_order_is_fixed():
    learner = make_mann()
    tasks = make_tasks(dtype=F64)
    torch.manual_seed(1)
    first = learner(tasks)[0]
    second = learner(tasks)[0]
    assert (first - second).abs() > 1e-6  # another support order, another loss
    learner.eval()
    rng = torch.get_rng_state()
    with torch.no_grad():
        losses, accs = learner.evaluate(tasks)
        again = learner.evaluate(tasks)
    assert torch.equal(torch.get_rng_state(), rng)  # evaluation draws nothing from the global RNG
    assert torch.equal(losses, again[0]) and torch.equal(accs, again[1])


def test_evaluation_of_a_task_does_not_depend_on_the_other_tasks_in_the_batch():
    learner = make_mann().eval()
    tasks = make_tasks(T=3, dtype=F64)
    with torch.no_grad():
        losses, accs = learner.evaluate(tasks)
        for i in range(3):
            alone = learner.evaluate(tasks.task(i))
            torch.testing.assert_close(alone[0], losses[i : i + 1], rtol=0, atol=1e-13)
            torch.testing.assert_close(alone[1], accs[i : i + 1])
        # adapt/predict gives evaluate's logits for a task.
        predict = learner.adapt(tasks.support_x[1], tasks.support_y[1])
        logits = predict(tasks.query_x[1])
    assert logits.shape == (10, 5)
    torch.testing.assert_close(
        F.cross_entropy(logits, tasks.query_y[1]), losses[1], rtol=0, atol=1e-13
    )


# -- no leakage between queries --------------------------------------------------------------------
def test_permuting_the_queries_permutes_their_logits():
    learner = make_mann().eval()  # Conv4: batch-norm statistics do not depend on the item order
    tasks = make_tasks(T=2, queries=3, dtype=F64)
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x)[2]
        permuted = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x[:, perm])[
            2
        ]
    diff = (permuted - logits[:, perm]).abs().max().item()
    print(f"permuted queries vs permuted logits: max abs diff {diff:.1e}")
    assert diff < 1e-12


def test_changing_one_query_changes_only_that_querys_logits():
    # A backbone without batch norm, so the only path between queries would be the memory's.
    learner = make_mann(PerItemLinear(28 * 28, 8)).eval()
    tasks = make_tasks(T=2, queries=3, dtype=F64)
    changed = tasks.query_x.clone()
    changed[1, 4] = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(5), dtype=F64)
    with torch.no_grad():
        logits = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x)[2]
        after = learner.episode_logits(tasks.support_x, tasks.support_y, changed)[2]
    moved = (after - logits).abs().amax(dim=-1)  # [T, Q]
    assert moved[1, 4] > 1e-4
    moved[1, 4] = 0
    print(f"other queries' logits moved by at most {moved.max().item():.1e}")
    assert moved.max() == 0


# -- training plumbing -------------------------------------------------------------------------------
def test_every_parameter_gets_a_finite_gradient_and_metrics_are_detached():
    learner = make_mann(score_support=True)
    loss, metrics = learner(make_tasks(dtype=F64), diagnostics=True)
    loss.backward()
    assert set(metrics) == {"loss", "accuracy", "support_accuracy"}
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())
    for name, p in learner.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_score_support_adds_the_support_steps_to_the_loss():
    tasks = make_tasks(dtype=F64)
    learner = make_mann().eval()  # fixed order, so both settings see the same sequence
    with torch.no_grad():
        support_logits, labels, query_logits = learner.episode_logits(
            tasks.support_x, tasks.support_y, tasks.query_x
        )
        query_only = learner.task_losses(support_logits, labels, query_logits, tasks.query_y)
        learner.score_support = True
        both = learner.task_losses(support_logits, labels, query_logits, tasks.query_y)
    support_ce = F.cross_entropy(support_logits.transpose(1, 2), labels, reduction="none").sum(
        1
    )  # [T]
    torch.testing.assert_close(both, (support_ce + query_only * 10) / 15)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"read_heads": 0}, "algorithm.read_heads=0 must be at least 1"),
        (
            {"memory_slots": 2, "read_heads": 4},
            "algorithm.read_heads=4 exceeds algorithm.memory_slots=2",
        ),
        ({"gamma": 1.5}, r"algorithm.gamma=1.5 must be in \[0, 1\]"),
        ({"key_strength": 0.0}, "algorithm.key_strength=0.0 must be positive"),
    ],
)
def test_impossible_hyperparameters_name_the_key(kwargs, message):
    with pytest.raises(MetarunError, match=message):
        MANN(Conv4(hidden=4), n_way=5, **kwargs)


# -- real data ------------------------------------------------------------------------------------
def test_short_mann_run_learns_well_above_chance(make_config, tmp_path):
    # MANN leaves chance level only after a few hundred steps (its LSTM and memory must learn to
    # bind labels first), so this run is cheap per step rather than short: a 16-channel Conv4,
    # 5-shot episodes (more matches to learn from per episode), one query per class.
    # Test accuracy with seeds 0, 1, 2: 0.414, 0.466, 0.402 (chance 0.2).
    cfg = make_config(
        "algorithm=mann",
        "model.hidden=16",
        "episode=5w5s",
        "episode.meta_batch_size=4",
        "episode.n_query=1",
        "train.steps=500",
        "train.val_every=250",
        "train.log_every=50",
        "eval.episodes=100",
    )
    results = Trainer(cfg, tmp_path).run()
    assert results["test_accuracy"] >= 0.32
