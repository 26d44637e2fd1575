"""eval.ensemble_top_k: the K best validations' checkpoints kept beside best.pt and tested together,
each test episode's query class probabilities averaged over them (MAML++: Antoniou et al., 2019)."""

from __future__ import annotations

import json

import pytest
import torch

from metarun import run_dir as files
from metarun.checkpoint import load_checkpoint
from metarun.evaluation import query_probabilities
from metarun.experiment import Experiment
from metarun.saved_run import restore
from metarun.trainer import Trainer
from tests.conftest import compose_config, one_line_error

# ProtoNet with a 16-channel Conv4 on tiny episodes: 10 steps, a validation every 2 (5 of them).
TINY = (
    "device=cpu",
    "algorithm=protonet",
    "model.hidden=16",
    "episode.meta_batch_size=2",
    "episode.n_query=2",
    "train.steps=10",
    "train.val_every=2",
    "train.val_episodes=4",
    "train.log_every=2",
    "eval.episodes=6",
    "eval.batch_size=3",  # two batches: the episodes are put back in order
    "eval.base_images=50",
)
K = 3


def tiny(omniglot_root, omniglot_cache, *overrides: str):
    return compose_config(
        "dataset=omniglot",
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
        *TINY,
        *overrides,
    )


def without_machine(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("config", "wall_time_s")}


def member_steps(run_dir) -> set[int]:
    return set(files.ensemble_member_files(run_dir))


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, omniglot_root, omniglot_cache):
    """One run with eval.ensemble_top_k=3 and 5 validations, read by several tests."""
    run_dir = tmp_path_factory.mktemp("ensemble")
    cfg = tiny(omniglot_root, omniglot_cache, f"eval.ensemble_top_k={K}")
    return run_dir, cfg, Trainer(cfg, run_dir).run()


def hand_probabilities(cfg, checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(predict(query)) after adapt(support), episode by episode, with `checkpoint`'s
    weights: `[E, M, N]`, and the labels `[E, M]`."""
    experiment = Experiment(cfg, parts=("test",))
    learner = experiment.learner.eval()
    restore(learner, load_checkpoint(checkpoint), checkpoint)
    tasks = experiment.samplers["test"].episodes(cfg.eval.seed, 0, cfg.eval.episodes)
    with torch.no_grad():
        probabilities = [
            learner.adapt(tasks.support_x[t], tasks.support_y[t])(tasks.query_x[t]).softmax(-1)
            for t in range(cfg.eval.episodes)
        ]
    return torch.stack(probabilities), tasks.query_y


def test_the_ensemble_averages_the_softmax_probabilities_of_the_k_best_checkpoints(ensemble_run):
    run_dir, cfg, results = ensemble_run
    members = load_checkpoint(files.checkpoint_file(run_dir, "last"))["top_k"]
    assert len(members) == K
    by_member = [
        hand_probabilities(cfg, files.ensemble_member_file(run_dir, m["step"])) for m in members
    ]
    labels = by_member[0][1]
    mean = torch.stack([p for p, _ in by_member]).double().mean(dim=0)  # [E, M, N]
    accuracy = (mean.argmax(dim=-1) == labels).double().mean(dim=-1)  # [E]
    nll = -mean.gather(-1, labels[..., None]).log().mean(dim=(1, 2))  # [E]
    per_episode = json.loads(files.test_episodes_file(run_dir).read_text())["values"]
    torch.testing.assert_close(torch.tensor(per_episode, dtype=torch.float64), accuracy)
    assert results["test_accuracy"] == pytest.approx(accuracy.mean().item(), abs=1e-12)
    assert results["test_loss"] == pytest.approx(nll.mean().item(), rel=1e-6)
    # What the trainer averages for one member is that member's softmax, computed by hand above.
    experiment = Experiment(cfg, parts=("test",))
    last_member = files.ensemble_member_file(run_dir, members[-1]["step"])
    restore(experiment.learner, load_checkpoint(last_member), last_member)
    probabilities, seen = query_probabilities(
        experiment.learner, experiment.samplers["test"], 6, cfg.eval.seed, cfg.eval.batch_size
    )
    torch.testing.assert_close(probabilities, by_member[-1][0])
    assert torch.equal(seen, labels)


def test_only_the_k_best_validations_checkpoints_remain_and_results_name_them(ensemble_run):
    run_dir, _, results = ensemble_run
    lines = [json.loads(line) for line in files.metrics_file(run_dir).read_text().splitlines()]
    val = [(line["step"], line["accuracy"]) for line in lines if line["split"] == "val"]
    assert len(val) == 5 > K
    best = sorted(val, key=lambda v: (-v[1], v[0]))[:K]  # ties: the earlier validation stays
    assert member_steps(run_dir) == {step for step, _ in best}
    assert results["ensemble"] == {
        "top_k": K,
        "members": [
            {"step": step, "checkpoint": f"checkpoints/top-step{step}.pt", "val_accuracy": score}
            for step, score in best
        ],
    }
    for step, score in best:  # each file holds the weights of its validation
        member = load_checkpoint(files.ensemble_member_file(run_dir, step))
        assert member["step"] == step and member["val"]["accuracy"] == score
    assert load_checkpoint(files.checkpoint_file(run_dir, "best"))["step"] == best[0][0]


def test_a_resumed_run_keeps_the_same_top_k_as_a_straight_one(
    ensemble_run, omniglot_root, omniglot_cache, tmp_path
):
    straight_dir, _, straight = ensemble_run
    config = lambda steps: tiny(
        omniglot_root, omniglot_cache, f"eval.ensemble_top_k={K}", f"train.steps={steps}"
    )
    Trainer(config(6), tmp_path).run()  # stops after its third validation
    resumed = Trainer(config(10), tmp_path)
    assert resumed.step == 6 and len(resumed.top.members) == K
    results = resumed.run()
    assert without_machine(results) == without_machine(straight)
    last = lambda d: load_checkpoint(files.checkpoint_file(d, "last"))["top_k"]
    assert last(tmp_path) == last(straight_dir)
    assert member_steps(tmp_path) == member_steps(straight_dir)


def test_top_k_of_one_keeps_no_more_files_and_tests_best_pt_as_before(
    ensemble_run, omniglot_root, omniglot_cache, tmp_path
):
    from tests.test_unchanged_outputs import FIXTURES

    _, _, with_ensemble = ensemble_run
    cfg = tiny(omniglot_root, omniglot_cache)  # eval.ensemble_top_k=1, the default
    results = Trainer(cfg, tmp_path).run()
    assert member_steps(tmp_path) == set()
    assert load_checkpoint(files.checkpoint_file(tmp_path, "last"))["top_k"] == []
    # results.json has the keys it had before eval.ensemble_top_k (the wall time is machine's).
    before = json.loads((FIXTURES / "protonet" / "results.json").read_text())
    assert set(results) - {"wall_time_s"} == set(before)
    # The test is best.pt's, scored as the run's test always was.
    experiment = Experiment(cfg, parts=("test",))
    best = files.checkpoint_file(tmp_path, "best")
    restore(experiment.learner, load_checkpoint(best), best)
    test = experiment.evaluate("test", cfg.eval.episodes)
    assert (results["test_accuracy"], results["test_loss"]) == (test["accuracy"], test["loss"])
    # Keeping the top K changes the test only: the same training, validations and best.pt.
    assert results["best_val_accuracy"] == with_ensemble["best_val_accuracy"]
    assert results["test_accuracy"] != with_ensemble["test_accuracy"] or (
        results["test_loss"] != with_ensemble["test_loss"]
    )


def test_with_fewer_validations_than_k_the_ensemble_is_those_there_are_and_says_so(
    omniglot_root, omniglot_cache, tmp_path, capsys
):
    cfg = tiny(omniglot_root, omniglot_cache, f"eval.ensemble_top_k={K}", "train.steps=2")
    results = Trainer(cfg, tmp_path).run()
    log = capsys.readouterr().out
    assert (
        f"eval.ensemble_top_k={K}, but the run has kept only 1 validation checkpoint (step 2): "
        "the test averages that one" in log
    )
    assert [m["step"] for m in results["ensemble"]["members"]] == [2]
    # An ensemble of one is that checkpoint's own test.
    experiment = Experiment(cfg, parts=("test",))
    best = files.checkpoint_file(tmp_path, "best")
    restore(experiment.learner, load_checkpoint(best), best)
    test = experiment.evaluate("test", cfg.eval.episodes)
    assert results["test_accuracy"] == pytest.approx(test["accuracy"], abs=1e-6)  # it in float32
    assert results["test_loss"] == pytest.approx(test["loss"], rel=1e-5)


@pytest.mark.parametrize("value", [0, -2])
def test_a_top_k_below_one_is_one_line_naming_the_fix(
    omniglot_root, omniglot_cache, tmp_path, value
):
    cfg = tiny(omniglot_root, omniglot_cache, f"eval.ensemble_top_k={value}")
    message = one_line_error(lambda: Trainer(cfg, tmp_path / "run"))
    assert message == (
        f"eval.ensemble_top_k={value} must be positive; pass eval.ensemble_top_k=<a value > 0>"
    )
    assert not (tmp_path / "run").exists()


def test_an_ensemble_of_regression_learners_is_one_line_naming_the_fix(tmp_path):
    cfg = compose_config("+experiment=maml_sinusoid", "device=cpu", "eval.ensemble_top_k=2")
    message = one_line_error(lambda: Trainer(cfg, tmp_path / "run"))
    assert message.startswith("eval.ensemble_top_k=2 averages the class probabilities")
    assert message.endswith("set eval.ensemble_top_k=1")
    assert not (tmp_path / "run").exists()


def test_an_ensemble_with_test_checkpoint_last_is_one_line_naming_the_fix(
    omniglot_root, omniglot_cache, tmp_path
):
    cfg = tiny(omniglot_root, omniglot_cache, "eval.ensemble_top_k=2", "train.test_checkpoint=last")
    message = one_line_error(lambda: Trainer(cfg, tmp_path / "run"))
    assert message.endswith("set eval.ensemble_top_k=1 or train.test_checkpoint=best")


def test_metarun_eval_tests_an_ensemble_run_as_it_was_and_k_of_one_as_best_pt(ensemble_run):
    from metarun.commands.eval import evaluate_run

    run_dir, cfg, results = ensemble_run
    _, again = evaluate_run(run_dir, [])
    same = ("test_accuracy", "test_loss", "ci95", "ensemble")
    assert {k: again[k] for k in same} == {k: results[k] for k in same}
    _, alone = evaluate_run(run_dir, ["eval.ensemble_top_k=1"])
    assert "ensemble" not in alone
    experiment = Experiment(cfg, parts=("test",))
    best = files.checkpoint_file(run_dir, "best")
    restore(experiment.learner, load_checkpoint(best), best)
    assert alone["test_accuracy"] == experiment.evaluate("test", 6)["accuracy"]
