"""`metarun-eval RUN_DIR [key=value ...]` on short real Omniglot runs (ProtoNet, first-order MAML)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from metarun.commands.eval import main
from metarun.config import build
from metarun.data.sampler import EpisodeSampler
from metarun.evaluation import evaluate as meta_test
from metarun.saved_run import open_run
from metarun.trainer import Trainer
from tests.conftest import compose_config
from tests.test_zoo import tiny
from tests.trained_runs import trained_run


@pytest.fixture(scope="module")
def protonet_run(tmp_path_factory, omniglot_root, omniglot_cache):
    return trained_run("protonet", tmp_path_factory, omniglot_root, omniglot_cache)


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory, omniglot_root, omniglot_cache):
    return trained_run("maml", tmp_path_factory, omniglot_root, omniglot_cache)


def checksums(run_dir, skip_eval: bool = True) -> dict:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in run_dir.rglob("*")
        if p.is_file() and not (skip_eval and p.relative_to(run_dir).parts[0] == "eval")
    }


def evaluate(run_dir, name, *arguments) -> tuple[dict, dict]:
    """Run metarun-eval; returns the results.json and test_episodes.json it wrote into eval/<name>/."""
    main([str(run_dir), *arguments])
    out = run_dir / "eval" / name
    return json.loads((out / "results.json").read_text()), json.loads(
        (out / "test_episodes.json").read_text()
    )


def test_without_overrides_it_repeats_the_runs_own_test_and_changes_nothing_else(protonet_run):
    run_dir, trained = protonet_run
    before = checksums(run_dir)
    main([str(run_dir)])
    out = run_dir / "eval" / "default"
    results = json.loads((out / "results.json").read_text())
    episodes = json.loads((out / "test_episodes.json").read_text())
    own = json.loads((run_dir / "test_episodes.json").read_text())
    assert (
        results["test_accuracy"] == trained["test_accuracy"] and results["ci95"] == trained["ci95"]
    )
    assert episodes == own  # the same episodes (identity) and the same score on each
    assert results["checkpoint"] == "best" and results["episodes"] == 60
    assert checksums(run_dir) == before
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "test_episodes.json"]


def test_twenty_way_tests_are_harder_but_far_above_chance(protonet_run):
    run_dir, trained = protonet_run
    results, episodes = evaluate(
        run_dir, "n_way=20,episodes=30", "eval.n_way=20", "eval.episodes=30"
    )
    assert episodes["identity"]["n_way"] == 20 and len(episodes["values"]) == 30
    assert 1 / 20 + 0.3 < results["test_accuracy"] < trained["test_accuracy"]


def test_eval_episode_sets_ways_shots_and_queries(protonet_run):
    run_dir, _ = protonet_run
    results, episodes = evaluate(
        run_dir, "twenty", "eval.episode=20w1s", "eval.episodes=10", "name=twenty"
    )
    identity = episodes["identity"]
    assert (identity["n_way"], identity["k_shot"], identity["n_query"], identity["episodes"]) == (
        20,
        1,
        15,
        10,
    )
    assert results["test_accuracy"] > 1 / 20 + 0.3


def test_lakes_background_split_tests_on_the_evaluation_alphabets(protonet_run):
    run_dir, _ = protonet_run
    results, episodes = evaluate(
        run_dir, "split=background,episodes=30", "dataset.split=background", "eval.episodes=30"
    )
    assert episodes["identity"]["dataset"]["split"] == "background"
    assert results["config"]["dataset"]["split"] == "background"
    assert results["test_accuracy"] > 0.2 + 0.4


def test_another_dataset_of_the_same_image_shape_tests_across_domains(
    protonet_run, colour_datasets
):
    """Chen et al. (2019)'s cross-domain protocol: Omniglot's model on a folder of other images (the
    fixture's RGB classes), decoded as the model's 1-channel 28x28 input."""
    run_dir, _ = protonet_run
    folder = [o for o in colour_datasets["folder"] if not o.startswith("dataset.image_size=")]
    results, episodes = evaluate(
        run_dir,
        "cross",
        *folder,
        "dataset.channels=1",
        "dataset.image_size=28",
        "eval.n_query=5",
        "eval.episodes=10",
        "device=cpu",
        "name=cross",
    )
    assert results["config"]["dataset"]["_target_"] == "metarun.data.folder.ImageFolder"
    assert episodes["identity"]["dataset"]["channels"] == 1 and episodes["identity"]["n_query"] == 5
    assert 0 <= results["test_accuracy"] <= 1 and len(episodes["values"]) == 10


def test_another_dataset_is_normalized_with_the_training_datasets_statistics(
    make_config, colour_datasets, tmp_path
):
    """Chen et al. (2019)'s cross-domain protocol normalizes source and target images alike: a
    mini-ImageNet run tested on CIFAR-FS classes gets them normalized with mini-ImageNet's mean and
    std (eval.normalization=train, the default), and with CIFAR's own only when asked (target)."""
    run_dir = tmp_path / "run"
    trainer = Trainer(
        tiny(make_config, "protonet", "train.steps=2", "train.val_every=2", dataset="miniimagenet"),
        run_dir,
    )
    trainer.run()  # its learner now holds best.pt's weights
    cifar = build(compose_config(*colour_datasets["cifarfs"]).dataset)
    stats = {
        "train": (trainer.dataset.mean, trainer.dataset.std),
        "target": (cifar.mean, cifar.std),
    }
    assert stats["train"] != stats["target"]
    for normalization, arguments in (("train", ()), ("target", ("eval.normalization=target",))):
        overrides = [*colour_datasets["cifarfs"], *arguments]
        mean, std = stats[normalization]
        expected = EpisodeSampler(cifar.part("test"), 5, 1, 2, "test", mean=mean, std=std)
        # The images that reach the learner ...
        reached = open_run(run_dir, overrides)[0].samplers["test"].episodes(0, 0, 2)
        assert torch.equal(reached.support_x, expected.episodes(0, 0, 2).support_x)
        assert torch.equal(reached.query_x, expected.episodes(0, 0, 2).query_x)
        # ... and the numbers metarun-eval writes from them.
        results, episodes = evaluate(run_dir, normalization, *overrides, f"name={normalization}")
        own = meta_test(trainer.learner, expected, 4, 0, 4)
        assert episodes["values"] == own["per_episode"] and results["test_loss"] == own["loss"]
        assert results["config"]["eval"]["normalization"] == normalization


def test_maml_adapts_with_more_steps_when_asked(maml_run):
    run_dir, trained = maml_run
    same, _ = evaluate(run_dir, "default")
    assert same["test_accuracy"] == trained["test_accuracy"]
    longer, _ = evaluate(run_dir, "eval_adaptation_steps=6", "algorithm.eval_adaptation_steps=6")
    assert longer["config"]["algorithm"]["eval_adaptation_steps"] == 6
    assert longer["test_accuracy"] != trained["test_accuracy"]
    assert longer["test_accuracy"] > 0.2 + 0.2


@pytest.mark.parametrize(
    "run, arguments, message",
    [
        (
            "protonet",
            ("optimizer.lr=0.1",),
            "optimizer.lr cannot change when a run is tested again",
        ),
        ("protonet", ("algorithm=maml",), "algorithm cannot change when a run is tested again"),
        ("protonet", ("seed=3",), "seed cannot change"),
        ("protonet", ("+eval.extra=1",), "evaluation only changes keys the run has"),
        (
            "protonet",
            ("eval.n_wya=20",),
            "this run's config has no eval.n_wya; did you mean eval.n_way?",
        ),
        ("protonet", ("eval.n_way=abc",), "give eval.n_way a value of its type"),
        (
            "protonet",
            ("eval.normalization=own",),
            "give eval.normalization one of train, target (it is train",
        ),
        ("protonet", ("eval.n_way=5,20",), "tests one setting at a time"),
        ("protonet", ("eval.episode=7w1s",), "eval.episode=7w1s is not in conf/episode/"),
        ("protonet", ("dataset=nothing",), "dataset/nothing"),
        (
            "protonet",
            ("dataset.channels=3",),
            "dataset.channels=3 but this run's model takes images of channels=1; "
            "set dataset.channels=1",
        ),
        ("protonet", ("model.batch_norm=running",), "which this run did not keep"),
        (
            "protonet",
            ("algorithm.eval_adaptation_steps=5",),
            "has no algorithm.eval_adaptation_steps",
        ),
        ("protonet", ("checkpoint=middle",), "checkpoint=middle is not one of best, last"),
        ("protonet", ("name=../up",), "must be a folder name"),
        (
            "maml",
            ("eval.n_way=20",),
            "MAML was built for 5-way tasks (its head) but got 20-way tasks; set eval.n_way=5",
        ),
    ],
)
def test_an_override_that_cannot_apply_is_one_line_and_writes_nothing(
    request, capsys, run, arguments, message
):
    run_dir, _ = request.getfixturevalue(f"{run}_run")
    before = checksums(run_dir, skip_eval=False)
    with pytest.raises(SystemExit) as exit:
        main([str(run_dir), *arguments])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("metarun-eval: error: ") and err.count("\n") == 1 and ";" in err
    assert message in err
    assert checksums(run_dir, skip_eval=False) == before


def test_a_run_without_a_checkpoint_or_with_a_truncated_one_is_one_line(
    protonet_run, tmp_path, capsys
):
    run_dir, _ = protonet_run
    untrained = tmp_path / "untrained"
    shutil.copytree(run_dir / ".hydra", untrained / ".hydra")
    truncated = tmp_path / "truncated"
    shutil.copytree(run_dir, truncated, ignore=shutil.ignore_patterns("eval"))
    best = truncated / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    for directory, message in (
        (untrained, "has no checkpoints/best.pt; train it first"),
        (truncated, "cannot read checkpoint"),
        (tmp_path / "nothing", "does not exist"),
    ):
        with pytest.raises(SystemExit) as exit:
            main([str(directory)])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and message in err
        assert not (directory / "eval").exists()
        if directory == truncated:
            assert err.rstrip().endswith("train it again or give checkpoint=last")
    main([str(truncated), "checkpoint=last"])  # the other checkpoint still reads
    assert (truncated / "eval" / "checkpoint=last" / "results.json").is_file()
