"""The logger group (conf/logger/): every logger gets the records metrics.jsonl and results.json have,
read back here with each tracker's own package from a real store (MLflow's SQLite database, W&B's
offline run file, the CSV file)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from metarun import run_dir as files
from metarun.config import hparams
from metarun.loggers.base import Logger
from metarun.loggers.named import build_loggers
from metarun.run_log import RunLog
from metarun.trainer import Trainer
from tests.conftest import compose_config, one_line_error
from tests.test_ensemble import TINY
from tests.test_ensemble import tiny as ensemble_tiny

# test_ensemble's tiny ProtoNet run, 6 steps long, a validation (and last.pt) every 3, each step logged.
LENGTH = ("train.steps=6", "train.val_every=3", "train.log_every=1")


@pytest.fixture
def tiny(omniglot_root, omniglot_cache):
    return lambda *overrides: ensemble_tiny(omniglot_root, omniglot_cache, *LENGTH, *overrides)


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in files.metrics_file(run_dir).read_text().splitlines()]


def by_key(lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{"<split>/<name>": [(step, value), ...]} of metrics.jsonl, in order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        for name, value in line.items():
            if name not in ("step", "split"):
                series.setdefault(f"{line['split']}/{name}", []).append((line["step"], value))
    return series


def sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


# -- the group -------------------------------------------------------------------------------------
def test_tensorboard_is_the_default_and_several_loggers_compose():
    assert list(compose_config().logger) == ["tensorboard"]
    cfg = compose_config("logger=[tensorboard,csv,mlflow]", "logger.mlflow.experiment=mine")
    assert list(cfg.logger) == ["tensorboard", "csv", "mlflow"]
    assert cfg.logger.mlflow.experiment == "mine"


def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    message = one_line_error(lambda: build_loggers(compose_config("logger=mlflow")))
    assert message == (
        "logger=mlflow needs the mlflow package, which is not installed; "
        "pip install 'metarun[mlflow]' (or choose another logger)"
    )


def test_a_tracking_server_that_does_not_answer_stops_the_run_before_it_writes(tiny, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    cfg = tiny("logger=mlflow", f"logger.mlflow.tracking_uri={uri}", "logger.mlflow.timeout_s=2")
    run_dir = tmp_path / "run"
    message = one_line_error(lambda: Trainer(cfg, run_dir))
    assert message.startswith(f"logger=mlflow: the tracking server {uri} does not answer (")
    assert not run_dir.exists()


# -- CSV -----------------------------------------------------------------------------------------
def test_csv_writes_the_rows_of_metrics_jsonl(tiny, tmp_path):
    Trainer(tiny("logger=[tensorboard,csv]"), tmp_path).run()
    with files.metrics_csv_file(tmp_path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    lines = metrics_lines(tmp_path)
    assert len(rows) == len(lines) > 6
    for row, line in zip(rows, lines):
        assert {k: v for k, v in row.items() if v != ""} == {k: str(v) for k, v in line.items()}
    assert (tmp_path / "tb").is_dir()  # both loggers ran


# -- MLflow ----------------------------------------------------------------------------------------
def mlflow_runs(uri: str, experiment: str = "metarun"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, [e.name for e in client.search_experiments()]
    return client, client.search_runs([found.experiment_id])


def assert_histories_equal_metrics_jsonl(client, run, run_dir: Path, timed: bool = True) -> None:
    """`timed=False` leaves out tasks per second: a resumed run keeps the speed the stopped run
    measured for the steps it had logged, and metrics.jsonl the speed of the second start."""
    expected = by_key(metrics_lines(run_dir))
    for key, points in expected.items():
        if not timed and key.endswith("tasks_per_s"):
            continue
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(step, pytest.approx(value)) for step, value in points], key


def test_mlflow_keeps_the_params_metrics_and_files_of_the_run(tiny, tmp_path):
    uri, run_dir = sqlite(tmp_path), tmp_path / "run"
    cfg = tiny("logger=mlflow", f"logger.mlflow.tracking_uri={uri}")
    results = Trainer(cfg, run_dir).run()
    client, runs = mlflow_runs(uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    expected = {k: str(v) for k, v in hparams(cfg).items() if not k.startswith("logger.")}
    assert run.data.params == expected
    assert_histories_equal_metrics_jsonl(client, run, run_dir)
    metrics = run.data.metrics
    assert metrics["test_accuracy"] == pytest.approx(results["test_accuracy"])
    assert metrics["ci95"] == pytest.approx(results["ci95"])
    assert metrics["best_val_accuracy"] == pytest.approx(results["best_val_accuracy"])
    tags = run.data.tags
    assert tags["run_dir"] == str(run_dir) and tags["batch_norm"] == "task"
    assert tags["head"] == results["head"]
    kept = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert kept == {"results.json", "test_episodes.json"}
    (tmp_path / "back").mkdir()
    local = client.download_artifacts(run.info.run_id, "results.json", str(tmp_path / "back"))
    assert json.loads(Path(local).read_text()) == results


def test_a_resumed_run_continues_its_mlflow_run_without_duplicated_steps(tiny, tmp_path):
    uri, run_dir = sqlite(tmp_path), tmp_path / "run"
    cfg = tiny("logger=mlflow", f"logger.mlflow.tracking_uri={uri}")
    trainer = Trainer(cfg, run_dir)
    steps = {"n": 0}
    train_step = trainer.train_step

    def killed_after_five(*args, **kwargs):  # last.pt holds step 3; steps 4 and 5 were logged
        if steps["n"] == 5:
            raise KeyboardInterrupt
        steps["n"] += 1
        return train_step(*args, **kwargs)

    trainer.train_step = killed_after_five
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    _, runs = mlflow_runs(uri)
    assert [r.info.status for r in runs] == ["KILLED"]
    Trainer(cfg, run_dir).run()
    client, runs = mlflow_runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for key in by_key(metrics_lines(run_dir)):
        logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]
        assert len(logged) == len(set(logged)), (key, logged)
    assert_histories_equal_metrics_jsonl(client, runs[0], run_dir, timed=False)


def test_a_sweeps_jobs_are_runs_of_one_experiment_tagged_with_their_overrides(
    tmp_path, omniglot_root, omniglot_cache
):
    uri, sweep = sqlite(tmp_path), tmp_path / "sweep"
    data = (
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
    )
    tiny = [o for o in (*TINY, *LENGTH) if not o.startswith("algorithm=")]
    done = subprocess.run(
        [sys.executable, "-m", "metarun.commands.train", "-m", "seed=0,1", *data, *tiny]
        + ["logger=mlflow", f"logger.mlflow.tracking_uri={uri}", f"hydra.sweep.dir={sweep}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    client, runs = mlflow_runs(uri, experiment=str(sweep))
    assert sorted(r.data.tags["override.seed"] for r in runs) == ["0", "1"]
    assert {r.info.run_name for r in runs} == {f"{sweep}/0", f"{sweep}/1"}
    assert all(r.data.tags["sweep.varying"] == "seed" for r in runs)
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]


# -- Weights & Biases --------------------------------------------------------------------------------
def offline_records(run_dir: Path) -> tuple[list[dict], dict]:
    """The history rows and the final summary of the run's offline W&B file, as wandb's own reader
    of its transaction log (`wandb leet inspect --json`) gives its records."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    wandb = Path(sys.executable).parent / "wandb"
    dump = subprocess.run(
        [wandb, "leet", "inspect", str(path), "--json"], capture_output=True, text=True, timeout=120
    )
    assert dump.returncode == 0, dump.stderr
    history, summary = [], {}
    for line in dump.stdout.splitlines():
        record = json.loads(line)
        if record["type"] == "history":
            history.append(record["history"]["item"])
        elif record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))  # each record updates the last
    return history, summary


def test_wandb_offline_writes_the_history_and_summary_of_the_run(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    results = Trainer(tiny("logger=wandb", "logger.wandb.mode=offline"), tmp_path).run()
    history, summary = offline_records(tmp_path)
    logged = {}
    for row in history:
        for key, value in row.items():
            if not key.startswith("_"):
                logged.setdefault(key, []).append((row["_step"], value))
    expected = by_key(metrics_lines(tmp_path))
    assert logged.keys() == expected.keys()
    for key, points in expected.items():
        assert logged[key] == [(step, pytest.approx(value)) for step, value in points], key
    assert summary["test_accuracy"] == pytest.approx(results["test_accuracy"])
    assert summary["ci95"] == pytest.approx(results["ci95"])
    assert summary["batch_norm"] == "task"
    assert json.loads(files.loggers_file(tmp_path).read_text())["wandb"]["id"]


# -- a tracker that fails mid-run ----------------------------------------------------------------------
class Flaky(Logger):
    name, remote = "flaky", True

    def scalars(self, split, step, values):
        if step == 3:
            raise ConnectionError("the server went away\nmore detail")
        self.last = step


def test_a_tracker_failing_mid_run_is_one_warning_and_training_goes_on(tmp_path):
    flaky = Flaky()
    log = RunLog(tmp_path, loggers=[flaky])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 6):
            log.scalars("train", step, {"loss": 1.0 / step})
    log.close()
    assert [str(w.message) for w in caught] == [
        "logger=flaky failed (ConnectionError: the server went away); it is left out for the "
        "rest of the run, whose numbers are all in metrics.jsonl"
    ]
    assert flaky.last == 2 and [line["step"] for line in metrics_lines(tmp_path)] == [1, 2, 3, 4, 5]


def test_an_unknown_logger_key_is_one_line():
    message = one_line_error(
        lambda: build_loggers(compose_config("logger=mlflow", "+logger.mlflow.colour=red"))
    )
    assert message == (
        "logger.mlflow.colour is not a key of logger=mlflow; its keys: tracking_uri, experiment, "
        "artifact_location, timeout_s (conf/logger/mlflow.yaml)"
    )
