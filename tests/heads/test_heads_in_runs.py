"""Heads in runs: trained through (`head=`), re-testing a trained run (`eval.head=`), the base
statistics a run keeps, and the one-line refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torchvision.transforms.v2.functional import normalize

from metarun.checkpoint import load_checkpoint, save_checkpoint
from metarun.commands.eval import main as metarun_eval
from metarun.commands.report import main as metarun_report
from metarun.experiment import Experiment
from metarun.saved_run import open_run
from metarun.trainer import Trainer
from tests.conftest import one_line_error
from tests.trained_runs import trained_run

TRAINED_THROUGH = ("cosine", "ridge", "r2d2", "svm")  # centroid: ProtoNet's own tests


@pytest.fixture(scope="module")
def protonet_run(tmp_path_factory, omniglot_root, omniglot_cache):
    return trained_run("protonet", tmp_path_factory, omniglot_root, omniglot_cache)


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory, omniglot_root, omniglot_cache):
    return trained_run("maml", tmp_path_factory, omniglot_root, omniglot_cache)


def retest(run_dir, head: str, *more: str) -> tuple[dict, dict]:
    metarun_eval([str(run_dir), f"eval.head={head}", *more, f"name={head}"])
    out = run_dir / "eval" / head
    return (json.loads((out / name).read_text()) for name in ("results.json", "test_episodes.json"))


def test_protonet_names_its_default_head_and_its_batch_norm_makes_it_transductive(protonet_run):
    _, results = protonet_run
    assert results["head"] == "centroid" and results["batch_norm"] == "task"
    assert results["transductive"] is True


def test_retesting_with_the_default_head_repeats_the_runs_own_test_episode_by_episode(
    protonet_run,
):
    run_dir, trained = protonet_run
    results, episodes = retest(run_dir, "centroid")
    own = json.loads((run_dir / "test_episodes.json").read_text())
    assert episodes == own and results["test_accuracy"] == trained["test_accuracy"]


@pytest.mark.parametrize("head", ["logreg", "simpleshot", "cosine", "bdcspn"])
def test_another_head_tests_the_same_episodes_well_above_chance(protonet_run, head):
    run_dir, trained = protonet_run
    results, episodes = retest(run_dir, head)
    own = json.loads((run_dir / "test_episodes.json").read_text())
    assert results["head"] == head and episodes["identity"] == own["identity"]
    assert results["test_accuracy"] > 0.6, results["test_accuracy"]  # chance: 0.2
    assert results["test_accuracy"] > trained["test_accuracy"] - 0.1


def test_the_report_pairs_two_heads_episode_by_episode(protonet_run, capsys):
    run_dir, _ = protonet_run
    retest(run_dir, "logreg")
    retest(run_dir, "ptmap")
    capsys.readouterr()
    metarun_report([str(run_dir / "eval"), "--compare", "eval.head=logreg", "eval.head=ptmap"])
    report = capsys.readouterr().out
    assert "ptmap, transductive" in report and "Paired over the 60 test episodes" in report


def test_a_run_keeps_the_mean_embedding_of_its_training_images_in_best_pt(protonet_run):
    run_dir, _ = protonet_run
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    saved = open_run(run_dir)
    learner, dataset = saved.experiment.learner, saved.experiment.dataset
    train = dataset.part("train")
    chosen = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(0))[:500]
    x = normalize(train.images[chosen].float() / 255, dataset.mean, dataset.std)
    with torch.no_grad():
        expected = learner.eval().model(x[None])[0].mean(0)  # one chunk of 500: the same batch
    torch.testing.assert_close(state["base_statistics"]["mean"], expected, rtol=1e-5, atol=1e-6)


def test_simpleshot_on_a_checkpoint_without_base_statistics_is_one_line(
    protonet_run, tmp_path, capsys
):
    run_dir, _ = protonet_run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("eval"))
    best = old / "checkpoints" / "best.pt"
    state = load_checkpoint(best)
    del state["base_statistics"], state["format"]
    save_checkpoint(state, best)
    with pytest.raises(SystemExit) as exit:
        metarun_eval([str(old), "eval.head=simpleshot"])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and error.count("\n") == 1
    assert "head=simpleshot needs the training classes' mean embedding" in error
    assert not (old / "eval").exists()


def test_a_head_on_the_meta_learned_body_of_maml(maml_run):
    run_dir, _ = maml_run
    results, _ = retest(run_dir, "centroid")
    assert results["head"] == "centroid" and results["test_accuracy"] > 0.4  # chance: 0.2


def test_eval_head_on_a_learner_without_an_embedding_is_one_line(make_config):
    cfg = make_config("algorithm=mann", "eval.head=centroid")
    message = one_line_error(lambda: Experiment(cfg, parts=()))
    assert "has no embedding of the support and query images" in message


def test_training_through_a_head_is_refused_where_it_cannot_be(make_config):
    message = one_line_error(lambda: Experiment(make_config("algorithm=maml", "head=svm"), ()))
    assert "does not train through a head" in message and "eval.head=NAME" in message
    message = one_line_error(lambda: Experiment(make_config("head=logreg"), ()))
    assert "head=logreg is not differentiable" in message


@pytest.mark.parametrize("head", TRAINED_THROUGH)
def test_protonet_trained_through_a_head_learns_omniglot(make_config, tmp_path, head):
    cfg = make_config(
        f"head={head}",
        "episode=20w1s",
        "episode.meta_batch_size=1",
        "episode.n_query=5",
        "eval.n_way=5",
        "eval.n_query=15",
        "train.steps=25",
        "train.val_every=25",
        "train.val_episodes=10",
        "eval.episodes=40",
        "eval.batch_size=40",
    )
    results = Trainer(cfg, tmp_path).run()
    assert results["head"] == head
    assert results["test_accuracy"] > 0.6, results["test_accuracy"]  # chance: 0.2


@pytest.mark.parametrize("head", TRAINED_THROUGH)
def test_protonet_trained_through_a_head_learns_a_colour_dataset(make_config, tmp_path, head):
    cfg = make_config(
        f"head={head}",
        "model.hidden=16",
        "train.steps=30",
        "train.val_every=30",
        "train.val_episodes=10",
        "episode.meta_batch_size=2",
        "episode.n_query=3",
        "eval.episodes=40",
        "eval.batch_size=40",
        dataset="miniimagenet",
    )
    results = Trainer(cfg, tmp_path).run()
    assert results["test_accuracy"] >= 0.4, results["test_accuracy"]  # chance: 0.2


def test_a_loaded_run_classifies_with_another_head(protonet_run):
    run_dir, _ = protonet_run
    from metarun.predict import load

    own, logreg = load(run_dir, device="cpu"), load(run_dir, device="cpu", head="logreg")
    tasks = own.dataset.part("test")
    images = [tasks.class_images(c)[:6] for c in range(5)]  # 5 classes, 1 support + 5 queries
    support = torch.stack([x[0] for x in images]).float() / 255
    queries = torch.cat([x[1:] for x in images]).float() / 255
    truth = torch.arange(5).repeat_interleave(5)
    accuracy = {}
    for name, model in (("own", own), ("logreg", logreg)):
        proba = model.adapt(support, list(range(5))).predict_proba(queries)
        accuracy[name] = (proba.argmax(1) == truth).float().mean().item()
    assert min(accuracy.values()) > 0.3, accuracy  # chance: 0.2 (25 queries of one task)
    assert type(logreg.predictor).__name__ == "HeadTest"


def test_eval_head_on_regression_tasks_is_one_line():
    from tests.conftest import compose_config

    cfg = compose_config("+experiment=maml_sinusoid", "eval.head=centroid", "device=cpu")
    assert "tasks are regression" in one_line_error(lambda: Experiment(cfg, parts=()))
