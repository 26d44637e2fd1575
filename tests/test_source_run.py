"""Runs that start from another run: model.init (a backbone) and algorithm.teacher (distillation),
what results.json and the report say about it, and the one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from metarun.checkpoint import load_checkpoint
from metarun.report import read_run
from metarun.trainer import Trainer
from tests.conftest import one_line_error

SHORT = ("episode.n_query=3", "eval.n_query=3", "model.batch_norm=running", "train.steps=10")


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, colour_datasets):
    """A short pretraining on the folder fixture, the source of the runs below."""
    from tests.conftest import SMALL_RUN, compose_config

    run_dir = tmp_path_factory.mktemp("source")
    cfg = compose_config(
        *colour_datasets["folder"], *SMALL_RUN, "algorithm=pretrain", *SHORT, "train.batch_size=16"
    )
    Trainer(cfg, run_dir).run()
    return run_dir


def backbone(state: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("algorithm, prefix", [("protonet", "model."), ("maml", "model.backbone.")])
def test_init_starts_the_backbone_from_the_source_run(
    make_config, tmp_path, source_run, algorithm, prefix
):
    cfg = make_config(
        f"algorithm={algorithm}", *SHORT, f"model.init={source_run}", dataset="folder"
    )
    trainer = Trainer(cfg, tmp_path)
    source = load_checkpoint(source_run / "checkpoints" / "best.pt")
    expected = backbone(source["learner"], "model.")
    started = backbone(trainer.learner.state_dict(), prefix)
    assert started.keys() == expected.keys()
    assert all(torch.equal(started[k], expected[k]) for k in expected)
    results = trainer.run()
    assert results["init"] == {
        "checkpoint": str(source_run / "checkpoints" / "best.pt"),
        "run": str(source_run),
        "step": source["step"],
    }


def test_a_resumed_run_keeps_where_it_started_and_the_report_shows_the_chain(
    make_config, tmp_path, source_run
):
    config = lambda steps: make_config(
        "algorithm=protonet",
        *SHORT,
        f"train.steps={steps}",
        f"model.init={source_run}",
        dataset="folder",
    )
    Trainer(config(10), tmp_path / "second").run()
    resumed = Trainer(config(20), tmp_path / "second")
    assert resumed.step == 10  # resumed from last.pt, not started again from the source
    assert resumed.run()["init"]["run"] == str(source_run)
    third = make_config(
        "algorithm=protonet", *SHORT, f"model.init={tmp_path / 'second'}", dataset="folder"
    )
    Trainer(third, tmp_path / "third").run()
    chain = read_run(tmp_path / "third").init
    assert chain == f"{tmp_path.name}/second <- {source_run.parent.name}/{source_run.name}"


def test_a_backbone_of_another_shape_is_one_line_naming_the_keys(make_config, tmp_path, source_run):
    cfg = make_config(
        "algorithm=protonet",
        *SHORT,
        "model.hidden=32",
        f"model.init={source_run}",
        dataset="folder",
    )
    message = one_line_error(lambda: Trainer(cfg, tmp_path / "run"))
    assert "its backbone does not fit this run's (shape of " in message
    assert "[64] vs [32]" in message  # the source is 64 wide
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing written


def test_sources_that_do_not_exist_or_have_not_finished_are_one_line(
    make_config, tmp_path, source_run
):
    missing = make_config("algorithm=protonet", *SHORT, "model.init=/no/such/run", dataset="folder")
    assert "model.init=/no/such/run does not exist" in one_line_error(
        lambda: Trainer(missing, tmp_path / "a")
    )
    (source_run / "results.json").rename(tmp_path / "results.json")
    try:
        unfinished = make_config(
            "algorithm=protonet", *SHORT, f"model.init={source_run}", dataset="folder"
        )
        assert "has not finished" in one_line_error(lambda: Trainer(unfinished, tmp_path / "b"))
        # Its checkpoint file, named, starts a run anyway.
        named = make_config(
            "algorithm=protonet",
            *SHORT,
            f"model.init={source_run}/checkpoints/last.pt",
            dataset="folder",
        )
        assert Trainer(named, tmp_path / "c").init["checkpoint"].endswith("last.pt")
    finally:
        (tmp_path / "results.json").rename(source_run / "results.json")


def test_a_distilled_generation_trains_on_the_teachers_predictions(
    make_config, tmp_path, source_run
):
    cfg = make_config(
        "algorithm=pretrain",
        *SHORT,
        "train.batch_size=16",
        "train.log_every=1",
        f"algorithm.teacher={source_run}",
        dataset="folder",
    )
    trainer = Trainer(cfg, tmp_path)
    teacher = trainer.learner.__dict__["teacher_net"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    source = load_checkpoint(source_run / "checkpoints" / "best.pt")["learner"]
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in source.items())
    trainer.run()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    train = [line for line in lines if line["split"] == "train"]
    assert all(line["loss"] == pytest.approx(0.5 * line["ce"] + 0.5 * line["kl"]) for line in train)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())
    not_pretrained = make_config(
        "algorithm=pretrain", *SHORT, f"algorithm.teacher={tmp_path}", dataset="folder"
    )
    Trainer(not_pretrained, tmp_path / "gen3")  # a distilled run teaches the next generation
