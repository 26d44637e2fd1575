import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.baseline import Baseline, global_labels
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.heads.finetune import (
    FINETUNE_SEED,
    cosine_logits,
    finetune_heads,
    init_head,
    minibatch_schedule,
)
from metarun.models.conv4 import Conv4
from metarun.trainer import Trainer
from tests.algorithms.synthetic import random_tasks

F64 = torch.float64
FINETUNE = dict(
    scale=2.0, epochs=5, lr=0.1, batch_size=2, momentum=0.9, dampening=0.9, weight_decay=1e-3
)


make_tasks = partial(
    random_tasks, k_shot=2, queries=3, n_classes=40, dtype=torch.float32
)  # this file's defaults


class FlatEmbedding(nn.Flatten):
    """Stub backbone: the pixels are the embedding (`[.., C, H, W] -> [.., C*H*W]`)."""

    def __init__(self, out_features: int):
        super().__init__(start_dim=-3)
        self.out_features = out_features


def test_cosine_classifier_equals_hand_computed_scaled_cosines():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=F64)
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]], dtype=F64)
    # cos((3,4),(1,0)) = 3/5; cos((3,4),(0,2)) = 8/10; cos((3,4),(-1,1)) = 1/(5 sqrt 2); (1,0): 1, 0, -1/sqrt 2.
    expected = 2.5 * torch.tensor(
        [[0.6, 0.8, 1 / (5 * math.sqrt(2))], [1.0, 0.0, -1 / math.sqrt(2)]], dtype=F64
    )
    logits = cosine_logits(x, w, scale=2.5)
    diff = (logits - expected).abs().max().item()
    print(f"cosine classifier vs hand computation: max abs diff {diff:.1e}")
    assert diff < 1e-15
    # Batched over tasks: [T, M, D] against [T, N, D].
    torch.testing.assert_close(
        cosine_logits(torch.stack([x, 2 * x]), torch.stack([w, w]), 2.5),
        torch.stack([expected, expected]),
        rtol=0,
        atol=1e-15,
    )


@pytest.mark.parametrize("cosine", [False, True])
def test_training_loss_is_cross_entropy_over_all_training_classes_with_labels_mapped_through_classes(
    cosine,
):
    # Two 2-way tasks of 2-pixel images; 4 training classes; the embedding is the pixels.
    support_x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [2.0, 0.0]]], dtype=F64).view(
        2, 2, 1, 1, 2
    )
    query_x = torch.tensor([[[0.5, 0.5], [1.0, 2.0]], [[0.0, 3.0], [1.0, -1.0]]], dtype=F64).view(
        2, 2, 1, 1, 2
    )
    support_y = torch.tensor([[1, 0], [0, 1]])
    query_y = torch.tensor([[0, 1], [1, 0]])
    classes = torch.tensor([[3, 0], [1, 2]])
    tasks = TaskBatch(support_x, support_y, query_x, query_y, 2, classes)
    learner = Baseline(FlatEmbedding(2), n_way=2, n_train_classes=4, cosine=cosine, scale=3.0).to(
        F64
    )
    with torch.no_grad():
        learner.head.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, 1.0], [2.0, -1.0]]))
        if not cosine:
            learner.head.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    loss, metrics = learner(tasks)

    w, b = (
        learner.head.weight.detach().tolist(),
        [0.0] * 4 if cosine else learner.head.bias.detach().tolist(),
    )
    # Support then query of task 0, then of task 1; labels through classes: task 0 maps 0->3, 1->0.
    items = [
        ((1.0, 0.0), 0),
        ((0.0, 1.0), 3),
        ((0.5, 0.5), 3),
        ((1.0, 2.0), 0),
        ((1.0, 1.0), 1),
        ((2.0, 0.0), 2),
        ((0.0, 3.0), 2),
        ((1.0, -1.0), 1),
    ]
    total, correct = 0.0, 0
    for x, c in items:
        if cosine:
            norm = math.hypot(*x)
            z = [3.0 * (x[0] * wc[0] + x[1] * wc[1]) / (norm * math.hypot(*wc)) for wc in w]
        else:
            z = [x[0] * wc[0] + x[1] * wc[1] + bc for wc, bc in zip(w, b)]
        total += math.log(sum(math.exp(v) for v in z)) - z[c]
        correct += max(range(4), key=lambda j: z[j]) == c
    diff = abs(loss.item() - total / len(items))
    print(
        f"Baseline{'++' if cosine else ''} training loss vs hand cross-entropy: abs diff {diff:.1e}"
    )
    assert diff < 1e-12
    assert metrics["accuracy"].item() == pytest.approx(correct / len(items))
    assert 0 < correct < len(items)  # the accuracy check distinguishes right from wrong labels
    loss.backward()
    assert learner.head.weight.grad.abs().sum() > 0


def test_global_labels_follow_classes():
    classes = torch.tensor([[7, 2, 5], [0, 9, 4]])
    labels = torch.tensor([[2, 0, 1, 1], [1, 1, 0, 2]])
    assert global_labels(labels, classes).tolist() == [[5, 7, 2, 2], [9, 9, 0, 4]]


def test_training_without_classes_says_what_is_missing():
    tasks = make_tasks()
    tasks.classes = None
    with pytest.raises(MetarunError, match="no classes"):
        Baseline(Conv4(hidden=4), n_way=5, n_train_classes=40)(tasks)


def reference_finetune(
    support_emb,
    support_y,
    n_way,
    cosine,
    scale,
    epochs,
    lr,
    batch_size,
    momentum,
    dampening,
    weight_decay,
):
    """The paper's per-task loop (methods/baselinefinetune.py): a fresh head per task and its own SGD,
    with the same initialization and mini-batch order as finetune_heads."""
    weights, biases = [], []
    for t in range(support_emb.shape[0]):
        g = torch.Generator().manual_seed(FINETUNE_SEED)
        w0, b0 = init_head(n_way, support_emb.shape[-1], g)
        head = nn.Linear(support_emb.shape[-1], n_way, bias=not cosine).to(F64)
        with torch.no_grad():
            head.weight.copy_(w0)
            if not cosine:
                head.bias.copy_(b0)
        opt = torch.optim.SGD(
            head.parameters(),
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
        )
        for idx in minibatch_schedule(support_emb.shape[1], epochs, batch_size, g):
            z = support_emb[t, idx]
            if cosine:
                w = head.weight
                scores = (
                    scale * (z / z.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
                )
            else:
                scores = head(z)
            opt.zero_grad()
            F.cross_entropy(scores, support_y[t, idx]).backward()
            opt.step()
        weights.append(head.weight.detach())
        biases.append(None if cosine else head.bias.detach())
    return torch.stack(weights), None if cosine else torch.stack(biases)


@pytest.mark.parametrize("cosine", [False, True])
def test_batched_finetuning_equals_the_per_task_sgd_loop(cosine):
    g = torch.Generator().manual_seed(1)
    support_emb = torch.randn(4, 10, 6, generator=g, dtype=F64)
    support_y = torch.arange(5).repeat_interleave(2)[torch.randperm(10, generator=g)].repeat(4, 1)
    weight, bias = finetune_heads(support_emb, support_y, 5, cosine=cosine, **FINETUNE)
    ref_weight, ref_bias = reference_finetune(support_emb, support_y, 5, cosine, **FINETUNE)
    diff = (weight - ref_weight).abs().max().item()
    if not cosine:
        diff = max(diff, (bias - ref_bias).abs().max().item())
    print(f"batched fine-tuning (cosine={cosine}) vs per-task SGD loop: max abs diff {diff:.1e}")
    assert diff < 1e-12
    assert (
        weight[0] - init_head(5, 6, torch.Generator().manual_seed(FINETUNE_SEED))[0]
    ).abs().max() > 1e-2


@pytest.mark.parametrize("cosine", [False, True])
def test_evaluating_tasks_together_equals_evaluating_each_alone(cosine):
    torch.manual_seed(0)
    learner = Baseline(
        Conv4(hidden=8), n_way=5, n_train_classes=40, cosine=cosine, finetune_epochs=10
    ).to(F64)
    tasks = make_tasks(T=3, dtype=F64)
    with torch.no_grad():
        logits = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, 5)
        losses, accs = learner.evaluate(tasks)
        alone = [
            learner.episode_logits(t.support_x, t.support_y, t.query_x, 5)[0]
            for t in (tasks.task(i) for i in range(3))
        ]
        predicted = learner.adapt(tasks.support_x[2], tasks.support_y[2])(tasks.query_x[2])
    diff = max((logits[i] - alone[i]).abs().max().item() for i in range(3))
    print(f"3 tasks batched vs each alone (cosine={cosine}): max abs logit diff {diff:.1e}")
    assert diff < 1e-12
    torch.testing.assert_close(predicted, logits[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(
        losses, F.cross_entropy(logits.transpose(1, 2), tasks.query_y, reduction="none").mean(1)
    )
    assert accs.shape == (3,)


def test_evaluation_leaves_the_backbone_untouched_and_works_under_no_grad():
    learner = Baseline(Conv4(hidden=8), n_way=5, n_train_classes=40, cosine=True, finetune_epochs=3)
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    tasks = make_tasks(T=2)
    with torch.no_grad():
        learner.evaluate(tasks)
        learner.adapt(tasks.support_x[0], tasks.support_y[0])(tasks.query_x[0])
    learner.evaluate(tasks)  # with gradients enabled too
    assert all(p.grad is None for p in learner.parameters())
    for name, p in learner.named_parameters():
        assert torch.equal(p, before[name]), name


def test_evaluation_is_deterministic_and_leaves_the_global_rng_alone():
    learner = Baseline(Conv4(hidden=8), n_way=5, n_train_classes=40, finetune_epochs=5)
    tasks = make_tasks(T=2)
    rng = torch.get_rng_state()
    with torch.no_grad():
        first = learner.evaluate(tasks)
        second = learner.evaluate(tasks)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_evaluation_handles_another_n_way_than_training():
    learner = Baseline(Conv4(hidden=8), n_way=5, n_train_classes=40, cosine=True, finetune_epochs=2)
    learner.check_n_way(20)
    tasks = make_tasks(T=2, n_way=20, k_shot=1, queries=1)
    with torch.no_grad():
        losses, accs = learner.evaluate(tasks)
    assert losses.shape == accs.shape == (2,) and torch.isfinite(losses).all()


def test_finetuning_fits_the_support_set():
    # Separable support embeddings: after fine-tuning the new head classifies its own support set.
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 3
    support_emb = (centers.repeat(2, 1) + 0.1 * torch.randn(10, 16, generator=g))[
        None
    ]  # [1, 10, 16]
    support_y = torch.arange(5).repeat(2)[None]
    for cosine in (False, True):
        weight, bias = finetune_heads(
            support_emb,
            support_y,
            5,
            cosine=cosine,
            scale=2.0,
            epochs=100,
            lr=0.01,
            batch_size=4,
            momentum=0.9,
            dampening=0.9,
            weight_decay=1e-3,
        )
        if cosine:
            logits = cosine_logits(support_emb, weight, 2.0)
        else:
            logits = support_emb @ weight.transpose(1, 2) + bias[:, None]
        assert (logits.argmax(-1) == support_y).all()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("finetune_epochs", 0, r"algorithm.finetune_epochs=0 must be at least 1"),
        ("finetune_batch_size", 0, r"algorithm.finetune_batch_size=0 must be at least 1"),
        ("finetune_lr", 0.0, r"algorithm.finetune_lr=0.0 must be positive"),
        ("scale", -1.0, r"algorithm.scale=-1.0 must be positive"),
        ("finetune_momentum", 1.0, r"algorithm.finetune_momentum=1.0 must be in \[0, 1\)"),
        ("finetune_weight_decay", -0.1, r"algorithm.finetune_weight_decay=-0.1 must be >= 0"),
    ],
)
def test_impossible_hyperparameters_name_the_key(key, value, message):
    with pytest.raises(MetarunError, match=message):
        Baseline(Conv4(hidden=4), n_way=5, n_train_classes=10, **{key: value})


def test_short_baseline_pp_run_learns_well_above_chance(make_config, tmp_path):
    # Batches of 16 images (8 classes x 2), the paper's batch size, at 3x the paper's learning rate so that
    # 1000 steps (0.2 epochs) learn: test accuracy 0.77 here; the untrained backbone with a fine-tuned
    # head gets 0.55, so the bound needs the backbone to have learned.
    cfg = make_config(
        "algorithm=baselinepp",
        "episode.n_way=8",
        "episode.k_shot=1",
        "episode.n_query=1",
        "episode.meta_batch_size=1",
        "optimizer.lr=0.003",
        "eval.n_way=5",
        "eval.k_shot=1",
        "eval.n_query=15",
        "train.steps=1000",
        "train.val_every=1000",
        "train.log_every=100",
        "eval.episodes=100",
        "eval.batch_size=50",
    )
    results = Trainer(cfg, tmp_path).run()
    assert results["test_accuracy"] >= 0.2 + 0.45


@pytest.mark.parametrize("experiment", ["baseline_omniglot_5w1s", "baselinepp_omniglot_5w1s"])
def test_the_experiments_test_inductively_as_the_papers_code(make_config, tmp_path, experiment):
    """The paper's code extracts test features in model.eval(), with the running statistics of
    training: a query's prediction depends on the support set and itself, not on the other queries."""
    cfg = make_config(
        f"+experiment={experiment}",
        "model.hidden=8",
        "train.val_episodes=4",
        "eval.episodes=4",
        "eval.n_query=3",
        "algorithm.finetune_epochs=2",
    )
    assert cfg.model.batch_norm == "running"
    trainer = Trainer(cfg, tmp_path)
    tasks = trainer.samplers["train"].sample(1, torch.Generator().manual_seed(0))
    trainer.train_step(tasks)
    trainer.train_step(tasks)
    running_mean = trainer.learner.model.blocks[0].norm.running_mean
    assert not torch.equal(running_mean, torch.zeros_like(running_mean))  # training kept statistics
    episode = trainer.samplers["test"].episodes(seed=0, start=0, count=1)
    predict = trainer.learner.eval().adapt(episode.support_x[0], episode.support_y[0])
    with torch.no_grad():
        together = predict(episode.query_x[0])  # [M, N]
        alone = torch.cat([predict(query[None]) for query in episode.query_x[0]])  # [M, N]
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-4)
