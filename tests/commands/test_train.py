"""`metarun` as a user runs it: bad input on an existing run directory changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from metarun.errors import MetarunError
from tests.conftest import COLOUR_DATASETS


def metarun(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metarun.commands.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def existing_run(tmp_path):
    """A run directory as a killed run leaves it, with a checkpoint cut off mid-write by hand."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("the config of an earlier run\n")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    (run_dir / "metrics.jsonl").write_text('{"step": 10, "split": "train", "loss": 1.0}\n')
    return run_dir


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ("episode.n_way=700",),
            "episode.n_way=700 but omniglot/val has 688 classes; lower episode.n_way",
        ),
        (("optimizer.lr=0",), "optimizer.lr=0 must be positive"),
        (
            ("optimizer.lr=abc",),
            "optimizer.lr='abc' should be a number; pass optimizer.lr=<a number > 0>",
        ),
        (("train.stepz=5",), "unknown config key train.stepz; did you mean train.steps?"),
        ((), "cannot read checkpoint"),
    ],
    ids=["too-many-ways", "zero-lr", "lr-not-a-number", "typo", "truncated-checkpoint"],
)
def test_bad_input_exits_2_with_one_line_and_leaves_the_run_directory_untouched(
    existing_run, omniglot_root, omniglot_cache, overrides, message
):
    before = snapshot(existing_run)
    result = metarun(
        f"hydra.run.dir={existing_run}",
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
        "device=cpu",
        *overrides,
        cwd=existing_run.parent,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("metarun: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert snapshot(existing_run) == before


def test_missing_data_with_downloads_off_says_where_to_put_the_files(tmp_path):
    result = metarun(
        f"hydra.run.dir={tmp_path / 'run'}",
        f"dataset.root={tmp_path / 'nothing'}",
        "dataset.download=false",
        "device=cpu",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"{tmp_path / 'nothing'}/omniglot-py/images_background is missing" in result.stderr
    assert "METARUN_DATA" in result.stderr
    assert not (tmp_path / "run").exists()  # Hydra made it, the failed run removed it again


def test_multirun_sweep_writes_one_run_directory_per_job(tmp_path, omniglot_root, omniglot_cache):
    result = metarun(
        "-m",
        "algorithm=maml",
        "algorithm.inner_lr=0.1,0.4",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
        "device=cpu",
        "episode.meta_batch_size=2",
        "episode.n_query=2",
        "train.steps=2",
        "train.val_every=2",
        "train.val_episodes=4",
        "eval.episodes=4",
        "eval.batch_size=4",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    runs = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert [p.parent.name for p in runs] == ["0", "1"]
    inner_lrs = [json.loads(p.read_text())["config"]["algorithm"]["inner_lr"] for p in runs]
    assert inner_lrs == [0.1, 0.4]
    assert [
        "algorithm.inner_lr=0.4" in (p.parent / ".hydra" / "overrides.yaml").read_text()
        for p in runs
    ] == [False, True]


def metarun_in_process(monkeypatch, *args: str) -> int:
    """`metarun ARGS` in this process (so that the session's fixtures, CIFAR's md5s, apply)."""
    from metarun.commands.train import main

    monkeypatch.setattr(sys, "argv", ["metarun", *args])
    try:
        main()
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize("dataset", COLOUR_DATASETS)
def test_every_colour_dataset_trains_from_the_cli_well_above_chance(
    colour_datasets, dataset, tmp_path, monkeypatch
):
    # ProtoNet, 5-way 1-shot, 40 episodes on 16x16 fixture images with the standard augmentation:
    # chance is 20%.
    code = metarun_in_process(
        monkeypatch,
        *colour_datasets[dataset],
        f"hydra.run.dir={tmp_path / 'run'}",
        "device=cpu",
        "algorithm=protonet",
        "augment=standard",
        "model.hidden=16",
        "episode.meta_batch_size=2",
        "episode.n_query=3",
        "train.steps=40",
        "train.val_every=20",
        "train.val_episodes=10",
        "eval.episodes=40",
        "eval.batch_size=40",
    )
    assert code == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["dataset"]["channels"] == 3
    assert results["test_accuracy"] >= 0.6, results["test_accuracy"]


@pytest.mark.parametrize(
    "error",
    [MetarunError("loss is NaN at step 3; lower optimizer.lr"), RuntimeError("CUDA error\nmore")],
    ids=["one-line-error", "crash"],
)
def test_a_run_that_fails_once_training_started_leaves_failed_json(
    tmp_path, omniglot_root, omniglot_cache, monkeypatch, error
):
    def fail(trainer):
        (trainer.run_dir / "metrics.jsonl").write_text(
            ""
        )  # training started: the directory holds the run
        raise error

    monkeypatch.setattr("metarun.trainer.Trainer.run", fail)
    args = (
        f"hydra.run.dir={tmp_path / 'run'}",
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
        "device=cpu",
        "episode.n_way=7",
    )
    if isinstance(error, MetarunError):
        assert metarun_in_process(monkeypatch, *args) == 2
    else:
        with pytest.raises(RuntimeError):
            metarun_in_process(monkeypatch, *args)
    failed = json.loads((tmp_path / "run" / "failed.json").read_text())
    line = str(error) if isinstance(error, MetarunError) else "RuntimeError: CUDA error"
    assert failed == {
        "error": line,
        "overrides": list(args[1:]),
    }  # hydra.* overrides are not the run's own
