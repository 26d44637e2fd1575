"""Sweeps as a user runs them (`metarun -m`): through submitit, with Optuna, with a failing point."""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from metarun.commands import report
from metarun.sweep import objective
from tests.commands.test_train import metarun_in_process

# Test-sized runs: a few seconds of training each.
TINY = (
    "device=cpu",
    "train.steps=4",
    "train.val_every=2",
    "train.val_episodes=5",
    "train.log_every=2",
    "eval.episodes=10",
    "eval.batch_size=5",
    "episode.meta_batch_size=2",
    "episode.n_query=2",
    "model.hidden=16",
)


@pytest.fixture
def data(omniglot_root, omniglot_cache) -> tuple[str, ...]:
    return (
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
    )


def metarun(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metarun.commands.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def results(job_dir: Path) -> dict:
    return json.loads((job_dir / "results.json").read_text())


# -- submitit ---------------------------------------------------------------------------------------
def test_local_launcher_runs_each_sweep_point_as_a_submitit_job_in_one_sweep_dir(tmp_path, data):
    sweep = tmp_path / "sweep"
    result = metarun(
        "-m",
        "hydra/launcher=local",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
        *data,
        *TINY,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert [results(sweep / job)["config"]["seed"] for job in ("0", "1")] == [0, 1]
    assert (
        len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
    )  # submitit's records stay in the sweep
    assert [p.name for p in tmp_path.iterdir()] == ["sweep"]
    # ... and metarun-report tabulates it: one configuration, two seeds, their mean test accuracy
    assert report.main([str(sweep)]) == 0
    with (sweep / "report.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    tests = [results(sweep / job)["test_accuracy"] for job in ("0", "1")]
    assert (row["n_seeds"], row["finished"]) == ("2", "2")
    assert float(row["test_mean"]) == pytest.approx(sum(tests) / 2)


def child_of(pid: int) -> int:
    """The process whose parent is `pid` (submitit's local controller starts the job as its child)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            return int(stat.parent.name)
    raise LookupError(f"no child of {pid}")


@pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="finds the job's process through /proc"
)
def test_a_requeued_submitit_job_resumes_in_its_own_job_directory(tmp_path, data):
    # The sweep directory's name holds microseconds: a requeued job that resolved ${now:} again
    # would land elsewhere. The job is preempted (submitit's SIGUSR2) once it has a checkpoint.
    sweep = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "metarun.commands.train",
            "-m",
            "hydra/launcher=local",
            "hydra.sweep.dir=sweeps/${now:%H-%M-%S-%f}",
            *data,
            *TINY,
            "train.steps=300",
            "train.val_every=5",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("sweeps/*/0/checkpoints/last.pt")):
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()
        time.sleep(0.05)
    controller = next(p for p in tmp_path.glob("sweeps/*/.submitit/*") if p.name.isdigit())
    os.kill(child_of(int(controller.name)), signal.SIGUSR2)
    _, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stderr

    [sweep_dir] = (tmp_path / "sweeps").iterdir()
    assert sorted(p.name for p in sweep_dir.iterdir() if not p.name.startswith(".")) == [
        "0",
        "multirun.yaml",
    ]
    log = (controller / f"{controller.name}_0_log.out").read_text()
    assert "Requeued job" in log and log.count("Starting with JobEnvironment") == 2
    assert results(sweep_dir / "0")["steps"] == 300
    train_steps = [
        json.loads(line)["step"]
        for line in (sweep_dir / "0" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    assert train_steps == sorted(
        set(train_steps)
    )  # the second start went on from last.pt, not from step 0


# -- failing sweep points ---------------------------------------------------------------------------
@pytest.mark.parametrize("launcher", ["basic", "local"])
def test_a_failing_sweep_point_writes_failed_json_and_the_sweep_exits_1_after_the_others(
    tmp_path, data, launcher
):
    sweep = tmp_path / "sweep"
    result = metarun(
        "-m",
        f"hydra/launcher={launcher}",
        "episode.n_way=5,1000",
        f"hydra.sweep.dir={sweep}",
        *data,
        *TINY,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert results(sweep / "0")["config"]["episode"]["n_way"] == 5
    error = (
        "episode.n_way=1000 but omniglot/val has 688 classes; lower episode.n_way to at most 688"
    )
    failed = json.loads((sweep / "1" / "failed.json").read_text())
    assert set(failed) == {"error", "overrides"} and failed["error"].startswith(error)
    assert failed["overrides"][0] == "episode.n_way=1000" and "device=cpu" in failed["overrides"]
    summary = result.stderr.splitlines()[-1]
    assert summary.startswith(
        f"metarun: 1 of 2 sweep jobs failed: {os.path.relpath(sweep / '1', tmp_path)} "
        f"(episode.n_way=1000: {error}"
    )


def test_a_crashing_sweep_job_records_its_exception_and_the_sweep_still_ends_with_exit_1(
    tmp_path, data, monkeypatch, capsys
):
    def crash(trainer):
        raise RuntimeError("CUDA out of memory\nTried to allocate 2 GiB")

    monkeypatch.setattr("metarun.trainer.Trainer.run", crash)
    sweep = tmp_path / "sweep"
    code = metarun_in_process(
        monkeypatch, "-m", "seed=0,1", f"hydra.sweep.dir={sweep}", *data, *TINY
    )
    assert code == 1
    assert [
        json.loads((sweep / job / "failed.json").read_text())["error"] for job in ("0", "1")
    ] == ["RuntimeError: CUDA out of memory"] * 2
    stderr = capsys.readouterr().err
    assert "Traceback" in stderr and "metarun: error: RuntimeError: CUDA out of memory" in stderr
    assert stderr.splitlines()[-1].startswith("metarun: 2 of 2 sweep jobs failed: ")


# -- Optuna -----------------------------------------------------------------------------------------
def study_trials(sweep: Path, name: str) -> list:
    with (
        warnings.catch_warnings()
    ):  # SQLAlchemy 1.4 on optuna 2's use of its older API, from the import on
        warnings.simplefilter("ignore")
        import optuna

        return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep}/optuna.db").trials


def test_optuna_best_value_is_the_best_validation_accuracy_of_its_trials(tmp_path, data):
    sweep = tmp_path / "sweep"
    result = metarun(
        "-m",
        "hydra/sweeper=protonet_lr",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep}",
        *data,
        *TINY,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    trials = study_trials(sweep, "protonet_lr")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    val = {t.number: results(sweep / str(t.number))["best_val_accuracy"] for t in trials}
    assert {t.number: t.value for t in trials} == val  # each trial scored by validation, not test
    best = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {max(val.values())}" in best


def test_optuna_study_continues_when_run_again_in_its_sweep_dir(tmp_path, data):
    sweep = tmp_path / "sweep"
    for _ in range(2):
        result = metarun(
            "-m",
            "hydra/sweeper=protonet_lr",
            "hydra.sweeper.n_trials=1",
            f"hydra.sweep.dir={sweep}",
            *data,
            *TINY,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
    trials = study_trials(sweep, "protonet_lr")
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    # Trial N in directory N: the second run's trial did not land in the first one's directory.
    assert [results(sweep / str(t.number))["best_val_accuracy"] for t in trials] == [
        t.value for t in trials
    ]


def test_an_optuna_sweep_goes_on_past_a_failed_trial(tmp_path, data):
    # 5000 classes per episode is impossible (omniglot/train has 4112); the seeded sampler draws it first.
    sweep = tmp_path / "sweep"
    result = metarun(
        "-m",
        "hydra/sweeper=protonet_lr",
        "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.n_trials=2",
        "episode.n_way=choice(5000,5)",
        f"hydra.sweep.dir={sweep}",
        *data,
        *TINY,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    trials = study_trials(sweep, "protonet_lr")
    assert [(t.params["episode.n_way"], t.state.name) for t in trials] == [
        (5000, "FAIL"),
        (5, "COMPLETE"),
    ]
    assert (sweep / "0" / "failed.json").is_file() and (sweep / "1" / "results.json").is_file()
    assert result.stderr.splitlines()[-1].startswith("metarun: 1 of 2 sweep jobs failed: sweep/0 (")


# -- configs and the objective ----------------------------------------------------------------------
def hydra_config(*overrides: str):
    import metarun.config  # noqa: F401  (registers the schema)

    with initialize_config_module("metarun.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra


def test_slurm_launcher_settings_are_overridable_and_requeue_a_few_times_by_default():
    launcher = hydra_config(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.mem_gb=64",
        "hydra.sweep.dir=somewhere",
    ).launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.mem_gb, launcher.max_num_timeout) == ("gpu", 64, 3)
    assert {"account", "gpus_per_node", "cpus_per_task", "timeout_min"} <= set(launcher)
    assert launcher.submitit_folder == "somewhere/.submitit/%j"


@pytest.mark.parametrize(
    "sweeper, params",
    [
        ("maml_lrs", {"algorithm.inner_lr", "optimizer.lr"}),
        ("protonet_lr", {"optimizer.lr", "episode.n_way"}),
    ],
)
def test_optuna_search_spaces_maximize_a_study_kept_in_the_sweep_dir(sweeper, params):
    hydra = hydra_config(f"hydra/sweeper={sweeper}", "hydra.sweep.dir=somewhere")
    config = hydra.sweeper
    assert (config.direction, config.study_name, config.storage) == (
        "maximize",
        sweeper,
        "sqlite:///somewhere/optuna.db",
    )
    assert params <= set(config.params)


def test_the_objective_is_the_best_validation_score_never_the_test_score():
    assert objective({"best_val_accuracy": 0.6, "test_accuracy": 0.9}) == 0.6
    assert objective({"best_val_mse": 0.5, "test_mse": 0.1}) == -0.5


def test_run_returns_the_best_validation_accuracy(tmp_path, data):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from metarun.commands.train import run

    with initialize_config_module("metarun.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*data, *TINY], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    task = copy.deepcopy(cfg)
    with open_dict(task):
        del task["hydra"]
    before = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        score = run(task)
    finally:
        HydraConfig.instance().cfg = before
    saved = results(tmp_path / "run")
    assert score == saved["best_val_accuracy"] != saved["test_accuracy"]


# -- a plugin that is not installed -----------------------------------------------------------------
# Runs metarun with a Hydra plugin hidden from Hydra's plugin scan, as if it were not installed.
WITHOUT_PLUGIN = """
import pkgutil, runpy, sys
hidden = sys.argv.pop(1)
walk = pkgutil.walk_packages
pkgutil.walk_packages = lambda *a, **k: (m for m in walk(*a, **k) if not m.name.startswith(hidden))
runpy.run_module("metarun.commands.train", run_name="__main__")
"""


@pytest.mark.parametrize(
    "plugin, choice, extra",
    [
        (
            "hydra_plugins.hydra_submitit_launcher",
            "hydra/launcher=slurm",
            "Hydra's submitit launcher: pip install 'metarun[slurm]'",
        ),
        (
            "hydra_plugins.hydra_optuna_sweeper",
            "hydra/sweeper=maml_lrs",
            "Hydra's Optuna sweeper: pip install 'metarun[optuna]'",
        ),
    ],
)
def test_a_missing_plugin_is_one_line_naming_the_extra_to_install(tmp_path, plugin, choice, extra):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_PLUGIN,
            plugin,
            "-m",
            choice,
            f"hydra.sweep.dir={tmp_path / 's'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr == f"metarun: error: {choice} needs {extra}\n"
    assert not (tmp_path / "s").exists()
