import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from metarun.algorithms.matchingnet import (
    MAX_FCE_PARAMETERS,
    FullContextEmbedding,
    MatchingNet,
    class_log_probs,
    cosine_similarity,
    fce_parameters,
)
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from metarun.models.resnet12 import ResNet12
from metarun.trainer import Trainer
from tests.conftest import REPO

F64 = torch.float64


def random_tasks(
    T=3, n_way=5, k_shot=2, queries=3, shape=(1, 28, 28), dtype=F64, seed=0
) -> TaskBatch:
    """Support labels shuffled per task, as the sampler shuffles them."""
    g = torch.Generator().manual_seed(seed)
    support_y = torch.stack(
        [
            torch.arange(n_way).repeat_interleave(k_shot)[
                torch.randperm(n_way * k_shot, generator=g)
            ]
            for _ in range(T)
        ]
    )
    return TaskBatch(
        torch.rand(T, n_way * k_shot, *shape, generator=g).to(dtype),
        support_y,
        torch.rand(T, n_way * queries, *shape, generator=g).to(dtype),
        torch.arange(n_way).repeat_interleave(queries).repeat(T, 1),
        n_way,
    )


def hand_computed_log_probs(support_emb, support_y, query_emb, n_way, scale=1.0):
    """One query at a time: explicit cosines, softmax, per-class sums of attention, log."""
    out = torch.empty(query_emb.shape[0], n_way, dtype=query_emb.dtype)
    for m, q in enumerate(query_emb):
        cosines = torch.stack([q @ s / (q.norm() * s.norm()) for s in support_emb])
        attention = torch.exp(scale * cosines) / torch.exp(scale * cosines).sum()
        for n in range(n_way):
            out[m, n] = torch.log(attention[support_y == n].sum())
    return out


@pytest.mark.parametrize("scale", [1.0, 7.0])
def test_matching_net_without_fce_equals_hand_computed_cosine_attention(scale):
    # "Images" of shape 1x1x8 embedded by flattening: the embeddings are the pixel values.
    learner = MatchingNet(nn.Flatten(start_dim=-3), n_way=5, cosine_scale=scale).to(F64)
    tasks = random_tasks(k_shot=3, shape=(1, 1, 8))
    logits = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, 5)  # [T, M, N]
    support_emb, query_emb = tasks.support_x.flatten(2), tasks.query_x.flatten(2)
    expected = torch.stack(
        [
            hand_computed_log_probs(support_emb[t], tasks.support_y[t], query_emb[t], 5, scale)
            for t in range(len(tasks))
        ]
    )
    diff = (logits - expected).abs().max().item()
    print(f"MatchingNet (scale {scale}) vs hand-computed cosine attention: max abs diff {diff:.1e}")
    assert diff < 1e-12
    # The loss is -log P(true class), its mean over queries; evaluate gives it per task.
    true_log_p = expected.gather(-1, tasks.query_y.unsqueeze(-1)).squeeze(-1)  # [T, M]
    loss, metrics = learner(tasks)
    assert abs(loss.item() + true_log_p.mean().item()) < 1e-12
    losses, accs = learner.evaluate(tasks)
    torch.testing.assert_close(losses, -true_log_p.mean(dim=1), rtol=0, atol=1e-12)
    torch.testing.assert_close(accs, (expected.argmax(-1) == tasks.query_y).float().mean(dim=1))
    predict = learner.adapt(tasks.support_x[1], tasks.support_y[1])
    torch.testing.assert_close(predict(tasks.query_x[1]), expected[1], rtol=0, atol=1e-12)


def test_class_log_probs_stay_finite_where_probabilities_underflow():
    # Attention logits 800 apart: exp underflows to 0 in float64, so log(sum(softmax)) would be -inf.
    logits = torch.tensor([[[0.0, -800.0, -900.0]]], dtype=F64)  # [T=1, M=1, S=3]
    log_p = class_log_probs(logits, torch.tensor([[0, 1, 1]]), n_way=2)
    expected_other = -800.0 + math.log1p(math.exp(-100.0))
    torch.testing.assert_close(
        log_p, torch.tensor([[[0.0, expected_other]]], dtype=F64), rtol=0, atol=1e-9
    )


def test_cosine_similarity_by_hand():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    b = torch.tensor([[4.0, 3.0], [0.0, 2.0], [-1.0, 0.0]])
    expected = torch.tensor([[24 / 25, 0.8, -0.6], [0.8, 0.0, -1.0]])
    torch.testing.assert_close(cosine_similarity(a, b), expected)


def make_fce_learner(hidden=6, fce_steps=3, seed=0) -> MatchingNet:
    torch.manual_seed(seed)
    return MatchingNet(Conv4(hidden=hidden), n_way=5, fce=True, fce_steps=fce_steps).to(F64)


def test_fce_logits_have_episode_shape_and_are_log_probabilities():
    learner = make_fce_learner()
    tasks = random_tasks(T=2, k_shot=2, queries=3)
    logits = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, 5)
    assert logits.shape == (2, 15, 5)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(2, 15, dtype=F64))
    assert learner.full_context.support_lstm.hidden_size == learner.model.out_features == 6
    assert learner.adapt(tasks.support_x[0], tasks.support_y[0])(tasks.query_x[0, :4]).shape == (
        4,
        5,
    )
    losses, accs = learner.evaluate(tasks)
    assert losses.shape == accs.shape == (2,)


def test_fce_gradients_reach_both_lstms_and_the_backbone():
    learner = make_fce_learner()
    loss, _ = learner(random_tasks())
    loss.backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert any(n.startswith("full_context.support_lstm.") for n, _ in learner.named_parameters())
    assert any(n.startswith("full_context.query_lstm.") for n, _ in learner.named_parameters())


def test_fce_results_do_not_depend_on_the_order_of_the_queries():
    learner = make_fce_learner()
    tasks = random_tasks()
    perm = torch.randperm(tasks.query_x.shape[1], generator=torch.Generator().manual_seed(1))
    logits = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x, 5)
    shuffled = learner.episode_logits(tasks.support_x, tasks.support_y, tasks.query_x[:, perm], 5)
    diff = (shuffled - logits[:, perm]).abs().max().item()
    print(f"FCE logits, queries permuted vs not: max abs diff {diff:.1e}")
    assert diff < 1e-12


def test_fce_query_embedding_follows_the_paper_with_concatenated_hidden_state():
    """The attention LSTM written as in the paper's appendix, one query at a time: the gates see
    f'(x_hat) and the concatenation [h_{k-1}, r_{k-1}]; our cell takes [f', r] as its input instead,
    the same function with its weight columns reordered."""
    torch.manual_seed(0)
    dim, steps = 4, 3
    fce = FullContextEmbedding(dim, steps).to(F64)
    query, support = torch.randn(2, 3, dim, dtype=F64), torch.randn(2, 5, dim, dtype=F64)
    cell = fce.query_lstm
    w_input = cell.weight_ih[:, :dim]  # acts on f'(x_hat)
    w_hidden = torch.cat([cell.weight_hh, cell.weight_ih[:, dim:]], dim=1)  # acts on [h, r]
    bias = cell.bias_ih + cell.bias_hh
    expected = torch.empty_like(query)
    for t in range(2):
        for m in range(3):
            f = query[t, m]
            h, c = f, torch.zeros(dim, dtype=F64)
            for _ in range(steps):
                a = torch.softmax(support[t] @ h, dim=0)
                r = (a[:, None] * support[t]).sum(0)
                i, fg, g, o = (w_input @ f + w_hidden @ torch.cat([h, r]) + bias).chunk(4)
                c = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c) + f
            expected[t, m] = h
    diff = (fce.embed_query(query, support) - expected).abs().max().item()
    print(f"attention LSTM vs the paper's equations: max abs diff {diff:.1e}")
    assert diff < 1e-12


def test_fce_support_embedding_is_bidirectional_lstm_plus_skip():
    torch.manual_seed(0)
    fce = FullContextEmbedding(4, 1).to(F64)
    support = torch.randn(2, 5, 4, dtype=F64)
    lstm = fce.support_lstm
    forward = nn.LSTM(4, 4, batch_first=True).to(F64)
    backward = nn.LSTM(4, 4, batch_first=True).to(F64)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(forward, f"{name}_l0").copy_(getattr(lstm, f"{name}_l0"))
            getattr(backward, f"{name}_l0").copy_(getattr(lstm, f"{name}_l0_reverse"))
    h_fwd, _ = forward(support)
    h_bwd, _ = backward(support.flip(1))
    expected = h_fwd + h_bwd.flip(1) + support
    torch.testing.assert_close(fce.embed_support(support), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fce", [False, True])
def test_evaluation_of_a_task_does_not_depend_on_the_other_tasks_in_the_batch(fce):
    torch.manual_seed(0)
    learner = MatchingNet(Conv4(hidden=6), n_way=5, fce=fce, fce_steps=2).to(F64).eval()
    tasks = random_tasks(T=3)
    with torch.no_grad():
        losses, accs = learner.evaluate(tasks)
        alone = [learner.evaluate(tasks.task(i)) for i in range(3)]
    torch.testing.assert_close(losses, torch.cat([loss for loss, _ in alone]), rtol=0, atol=1e-12)
    torch.testing.assert_close(accs, torch.cat([acc for _, acc in alone]))


def test_learned_scale_is_trained_and_starts_at_cosine_scale():
    torch.manual_seed(0)
    learner = MatchingNet(Conv4(hidden=6), n_way=5, cosine_scale=10.0, learn_scale=True)
    loss, metrics = learner(random_tasks(dtype=torch.float32), diagnostics=True)
    assert metrics["cosine_scale"].item() == pytest.approx(10.0)
    loss.backward()
    assert learner.log_scale.grad is not None and learner.log_scale.grad.abs() > 0
    fixed = MatchingNet(Conv4(hidden=6), n_way=5)
    assert not any(
        "scale" in name for name, _ in fixed.named_parameters()
    )  # the paper's plain cosine
    assert set(fixed(random_tasks(dtype=torch.float32), diagnostics=True)[1]) == {
        "loss",
        "accuracy",
    }


def test_fce_under_bf16_autocast_is_finite_and_close_to_float32():  # without FCE: tests/test_zoo.py
    torch.manual_seed(0)
    learner = MatchingNet(Conv4(hidden=8), n_way=5, fce=True, fce_steps=2, cosine_scale=5.0)
    tasks = random_tasks(T=2, dtype=torch.float32)
    loss32, _ = learner(tasks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _ = learner(tasks)
    loss16.backward()
    assert torch.isfinite(loss16)
    assert all(torch.isfinite(p.grad).all() for p in learner.parameters())
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()


def test_fce_under_bf16_autocast_runs_on_a_cpu_without_avx512():
    """oneDNN builds no bf16 LSTM without AVX-512; ONEDNN_MAX_CPU_ISA makes any x86 CPU such a one."""
    test = f"{Path(__file__).relative_to(REPO)}::test_fce_under_bf16_autocast_is_finite_and_close_to_float32"
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=REPO,
        env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
        capture_output=True,
        text=True,
    )
    assert child.returncode == 0, child.stdout[-2000:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fce": True, "fce_steps": 0}, r"algorithm.fce_steps=0 must be at least 1"),
        ({"cosine_scale": 0.0}, r"algorithm.cosine_scale=0.0 must be positive"),
        ({"fce": True, "model": nn.Flatten()}, r"model.out_features, which Flatten does not have"),
    ],
)
def test_impossible_settings_name_the_key_and_the_fix(kwargs, message):
    kwargs = {"model": Conv4(hidden=4), **kwargs}
    with pytest.raises(MetarunError, match=message):
        MatchingNet(n_way=5, **kwargs)


@pytest.mark.parametrize("dim", [1, 6, 64])
def test_fce_parameters_counts_both_lstms(dim):
    assert fce_parameters(dim) == sum(p.numel() for p in FullContextEmbedding(dim, 1).parameters())


def test_fce_on_resnet12s_flattened_84x84_map_is_refused_in_one_line_naming_the_fix():
    with torch.device(
        "meta"
    ):  # shapes only: the 7-billion-parameter LSTMs would not even be allocated
        backbone = ResNet12(image_size=84)
        with pytest.raises(
            MetarunError,
            match=r"out_features=16000 \(ResNet12's 640x5x5 map\): 7,168M parameters, "
            r"over the 100M limit; .*model=conv4.* or set algorithm.fce=false",
        ) as error:
            MatchingNet(backbone, n_way=5, fce=True)
    assert "\n" not in str(error.value)
    MatchingNet(
        backbone, n_way=5, fce=False
    )  # without FCE the flattened map is only a cosine's input


def test_fce_on_the_papers_mini_imagenet_conv4_is_accepted():
    with torch.device("meta"):
        learner = MatchingNet(Conv4(in_channels=3, image_size=84), n_way=5, fce=True)
    assert learner.model.out_features == 1600
    assert (
        sum(p.numel() for p in learner.full_context.parameters())
        == fce_parameters(1600)
        < MAX_FCE_PARAMETERS
    )


def test_short_omniglot_run_learns_well_above_chance(make_config, tmp_path):
    # The paper's plain cosine: 30 steps of 2 tasks reached 65.2% (5-way chance: 20%).
    cfg = make_config(
        "algorithm=matchingnet",
        "episode.meta_batch_size=2",
        "episode.n_query=5",
        "train.steps=30",
        "train.val_every=30",
        "eval.episodes=100",
    )
    results = Trainer(cfg, tmp_path).run()
    assert results["test_accuracy"] >= 0.45
