"""Contracts every algorithm in conf/algorithm/ meets, checked through the Trainer on real Omniglot
and on the colour datasets' fixtures (3-channel images, ragged classes in the folder dataset).

The algorithms are read from the config folder, so a new one is covered without editing this file.
Each algorithm's own math and a short learning run are in tests/algorithms/test_<name>.py.
"""

from __future__ import annotations

from importlib.resources import files

import pytest
import torch
from torch import Tensor

from metarun.config import validate
from metarun.errors import MetarunError
from metarun.models.layers import TaskBatchNorm
from metarun.trainer import Trainer
from tests.algorithms.synthetic import random_tasks
from tests.conftest import COLOUR_DATASETS, compose_config

ALGORITHMS = sorted(
    p.name.removesuffix(".yaml")
    for p in (files("metarun.conf") / "algorithm").iterdir()
    if p.name.endswith(".yaml")
)
EPISODES = ("5w1s", "5w5s", "20w1s", "20w5s")
# (dataset, episode): Omniglot on every episode config; the fixtures (5 val and test classes) at 5w1s.
DATASET_EPISODES = [("omniglot", episode) for episode in EPISODES] + [("folder", "5w1s")]
# The foundation's algorithms keep their paper settings in the algorithm config itself.
WITHOUT_EXPERIMENT = {"fomaml", "maml", "protonet"}
# Experiments of those whose recipe is not an episode config's.
EXPERIMENTS = {"pretrain": "pretrain_omniglot"}
# Algorithms whose output layer is built for episode.n_way: they refuse other n-way tasks.
FIXED_N_WAY = {"anil", "boil", "fomaml", "maml", "mann", "metalstm", "metasgd", "reptile"}


def tiny(make_config, algorithm: str, *overrides: str, dataset: str = "omniglot"):
    """A few steps of `algorithm` on small meta-batches, a 16-channel Conv4 (unless `overrides` choose
    another model) and at most 2 inner steps where the algorithm has them: contract checks, not accuracy."""
    own = compose_config(f"algorithm={algorithm}").algorithm
    fewer_steps = [
        f"algorithm.{key}={min(own[key], 2)}"
        for key in ("adaptation_steps", "eval_adaptation_steps")
        if key in own
    ]
    narrow = (
        [] if any(o.startswith("model=") for o in overrides) else ["model.hidden=16"]
    )  # Conv4's width
    return make_config(
        f"algorithm={algorithm}",
        *narrow,
        "episode.meta_batch_size=2",
        "episode.n_query=2",
        "train.val_episodes=4",
        "eval.episodes=4",
        "eval.batch_size=4",
        "train.batch_size=16",  # the images per step of those trained on single images (pretrain)
        *fewer_steps,
        *overrides,
        dataset=dataset,
    )


@pytest.mark.parametrize("dataset, episode", DATASET_EPISODES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_learns_one_batch_and_evaluates_per_task(
    make_config, tmp_path, algorithm, dataset, episode
):
    trainer = Trainer(tiny(make_config, algorithm, f"episode={episode}", dataset=dataset), tmp_path)
    tasks = trainer.training_batch()
    losses = [trainer.train_step(tasks)["loss"].item() for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses  # it fits the batch it is trained on

    episodes = trainer.samplers["test"].episodes(seed=0, start=0, count=3)
    trainer.learner.eval()
    with torch.no_grad():
        loss, accuracy = trainer.learner.evaluate(episodes)
        again = trainer.learner.evaluate(episodes)
        alone = [trainer.learner.evaluate(episodes.task(i)) for i in range(3)]
    assert loss.shape == accuracy.shape == (3,)
    assert ((0 <= accuracy) & (accuracy <= 1)).all()
    torch.testing.assert_close(again, (loss, accuracy), rtol=0, atol=0)  # deterministic
    # Per task: an episode's result does not depend on the episodes evaluated beside it.
    torch.testing.assert_close(torch.cat([a[0] for a in alone]), loss, rtol=1e-4, atol=1e-5)
    # float32 sums in another order may flip a near-tie on some CPUs: at most one query's prediction.
    one_query = 1 / episodes.query_y.shape[1]
    torch.testing.assert_close(
        torch.cat([a[1] for a in alone]), accuracy, rtol=0, atol=one_query + 1e-6
    )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_resumes_to_the_same_results(make_config, tmp_path, algorithm):
    config = lambda steps: tiny(make_config, algorithm, f"train.steps={steps}", "train.val_every=2")
    straight = Trainer(config(4), tmp_path / "straight").run()
    Trainer(config(2), tmp_path / "resumed").run()
    resumed = Trainer(config(4), tmp_path / "resumed").run()
    for key in ("test_accuracy", "test_loss", "best_val_accuracy", "steps"):
        assert resumed[key] == straight[key], key


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_tests_on_another_episode_config_or_says_why_not(
    make_config, tmp_path, algorithm
):
    cfg = tiny(make_config, algorithm, "episode=5w1s", "eval.episode=20w1s")
    if algorithm in FIXED_N_WAY:  # a head built for 5 ways: one line naming the fix
        with pytest.raises(MetarunError, match="eval.n_way=5") as error:
            Trainer(cfg, tmp_path)
        assert "\n" not in str(error.value)
        return
    trainer = Trainer(cfg, tmp_path)
    episodes = trainer.samplers["test"].episodes(seed=0, start=0, count=2)
    assert episodes.n_way == 20 and episodes.support_x.shape[1] == 20
    with torch.no_grad():
        _, accuracy = trainer.learner.eval().evaluate(episodes)
    assert accuracy.shape == (2,)


@pytest.mark.parametrize("algorithm", sorted(set(ALGORITHMS) - WITHOUT_EXPERIMENT))
def test_every_algorithm_has_a_paper_experiment_that_validates(algorithm):
    cfg = compose_config(f"+experiment={EXPERIMENTS.get(algorithm, algorithm + '_omniglot_5w1s')}")
    validate(cfg)
    own = compose_config(f"algorithm={algorithm}")
    assert cfg.algorithm._target_ == own.algorithm._target_
    # The paper's length, not a smoke-test length.
    assert cfg.train.steps >= 1000 if cfg.train.epochs is None else cfg.train.epochs >= 5


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_under_bf16_autocast_is_finite_and_close_to_float32(
    make_config, tmp_path, algorithm
):
    trainer = Trainer(tiny(make_config, algorithm), tmp_path)
    learner = trainer.learner
    tasks = trainer.training_batch()
    episodes = trainer.samplers["test"].episodes(seed=0, start=0, count=2)
    results = {}
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            torch.manual_seed(0)  # the same random choices in both passes (MANN's support order)
            loss, metrics = learner.train()(tasks)
            with torch.no_grad():
                eval_loss, _ = learner.eval().evaluate(episodes)
        results[bf16] = metrics["loss"], eval_loss
    loss.backward()  # the bf16 pass
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    grads = [p.grad for p in learner.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    (train32, eval32), (train16, eval16) = results[False], results[True]
    assert abs(train16 - train32) < 0.05 * train32
    assert (
        eval16.dtype == torch.float32 and (eval16 - eval32).abs().max() < 0.05 * eval32.abs().max()
    )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_classifies_or_refuses_tasks_of_another_n_way(
    make_config, tmp_path, algorithm
):
    trainer = Trainer(tiny(make_config, algorithm, "episode=5w1s"), tmp_path)
    learner = trainer.learner
    tasks = random_tasks(T=2, n_way=3, dtype=torch.float32, n_classes=40)
    if algorithm in FIXED_N_WAY:  # a head built for 5 ways: refused in one line naming the fix
        for call in (learner.train(), learner.eval().evaluate):
            with pytest.raises(MetarunError, match="set eval.n_way=5") as error:
                call(tasks)
            assert "\n" not in str(error.value)
        return
    # Trained on its own batches (tasks, or single images), tested on 3-way tasks.
    batch = tasks if learner.trains_on == "tasks" else trainer.training_batch()
    loss, _ = learner.train()(batch)
    with torch.no_grad():
        eval_loss, accuracy = learner.eval().evaluate(tasks)
    assert torch.isfinite(loss) and torch.isfinite(eval_loss).all() and accuracy.shape == (2,)


# MANN needs 400 steps to leave chance (about 30 s a dataset): its mini-ImageNet run stays in the
# default suite, the other three run with `make test-all`.
MANN_SLOW = {
    ("mann", dataset): pytest.mark.slow for dataset in COLOUR_DATASETS if dataset != "miniimagenet"
}
COLOUR_RUNS = [
    pytest.param(algorithm, dataset, marks=MANN_SLOW.get((algorithm, dataset), ()))
    for dataset in COLOUR_DATASETS
    for algorithm in ALGORITHMS
]


@pytest.mark.parametrize("algorithm, dataset", COLOUR_RUNS)
def test_every_algorithm_learns_each_colour_dataset_well_above_chance(
    make_config, tmp_path, algorithm, dataset
):
    # 30 steps on 16x16 fixture images whose classes differ in colour and stripes; chance is 20%.
    # Seed 0 on 2 CPU cores: 0.46 (first-order MAML on mini-ImageNet) is the lowest of all, and 0.51
    # (first-order MAML on CIFAR-FS with augmentation) the lowest with it.
    overrides = [
        "train.steps=30",
        "train.val_every=30",
        "train.val_episodes=10",
        "episode.n_query=3",
    ]
    if algorithm == "mann":
        # MANN leaves chance only after a few hundred steps (see tests/algorithms/test_mann.py), with
        # its recipe of 5-shot episodes and one query. Seed 0: 0.95 (mini-ImageNet), 0.72 (CIFAR-FS,
        # augmented), 0.64 (FC100).
        overrides = [
            "train.steps=400",
            "train.val_every=400",
            "train.val_episodes=10",
            "episode=5w5s",
            "episode.meta_batch_size=4",
            "episode.n_query=1",
        ]
    if algorithm == "boil":  # one inner step on the body with the head frozen: slower to start
        overrides[0] = "train.steps=60"
    if (
        dataset == "cifarfs"
    ):  # and with augmented support sets: in training, and 2 extra copies at test time
        overrides += ["augment=standard", "eval.support_augment=2"]
    cfg = tiny(
        make_config,
        algorithm,
        *overrides,
        "eval.episodes=40",
        "eval.batch_size=40",
        dataset=dataset,
    )
    assert cfg.model.in_channels == 3
    results = Trainer(cfg, tmp_path).run()
    assert results["test_accuracy"] >= 0.4, results["test_accuracy"]


def predictions_alone_and_together(learner, episode) -> tuple[Tensor, Tensor]:
    """Query logits of one test episode scored all together, and each query scored on its own."""
    predict = learner.eval().adapt(episode.support_x[0], episode.support_y[0])
    with torch.no_grad():
        together = predict(episode.query_x[0])  # [M, N]
        alone = torch.cat([predict(query[None]) for query in episode.query_x[0]])  # [M, N]
    return together, alone


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_in_running_batch_norm_a_querys_prediction_depends_only_on_the_support_set_and_itself(
    make_config, tmp_path, algorithm
):
    trainer = Trainer(tiny(make_config, algorithm, "model.batch_norm=running"), tmp_path)
    norms = [m for m in trainer.learner.modules() if isinstance(m, TaskBatchNorm)]
    assert norms and all(norm.mode == "running" for norm in norms)
    tasks = trainer.training_batch()
    trainer.train_step(tasks)
    trainer.train_step(tasks)
    assert not torch.equal(
        norms[0].running_mean, torch.zeros_like(norms[0].running_mean)
    )  # they moved
    episode = trainer.samplers["test"].episodes(seed=0, start=0, count=1)
    together, alone = predictions_alone_and_together(trainer.learner, episode)
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-4)


def test_in_task_batch_norm_a_querys_prediction_depends_on_the_other_queries(make_config, tmp_path):
    # The transductive setting, documented: each query batch is normalized with its own statistics.
    trainer = Trainer(tiny(make_config, "protonet"), tmp_path)
    episode = trainer.samplers["test"].episodes(seed=0, start=0, count=1)
    together, alone = predictions_alone_and_together(trainer.learner, episode)
    assert (alone - together).abs().max() > 1e-2


# Narrow versions of each backbone: the contract, not the papers' widths.
BACKBONES = {
    "resnet12": ("model=resnet12", "model.channels=[8,8,16,16]"),
    "resnet18": ("model=resnet18", "model.width=8"),
}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_trains_and_evaluates_on_every_backbone(
    make_config, tmp_path, algorithm, backbone
):
    cfg = tiny(make_config, algorithm, *BACKBONES[backbone], dataset="folder")
    trainer = Trainer(cfg, tmp_path)
    tasks = trainer.training_batch()
    losses = [trainer.train_step(tasks)["loss"].item() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    grads = [p.grad for p in trainer.learner.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        loss, accuracy = trainer.learner.eval().evaluate(
            trainer.samplers["test"].episodes(seed=0, start=0, count=2)
        )
    assert torch.isfinite(loss).all() and accuracy.shape == (2,)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_refuses_a_backbone_for_other_inputs_in_one_line(
    make_config, tmp_path, algorithm
):
    # The sinusoid MLP takes numbers, not images: refused before anything is written.
    with pytest.raises(
        MetarunError,
        match=r"MLP takes inputs of shape \(1,\) but folder's items have shape "
        r"\(3, 16, 16\); use a backbone for them: model=conv4",
    ) as error:
        Trainer(tiny(make_config, algorithm, "model=mlp", dataset="folder"), tmp_path / "run")
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()
