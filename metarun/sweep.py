"""Sweeps (`metarun -m ...`): what a sweep optimizes, what a failed job leaves, how the sweep ends.

A sweep job that fails writes failed.json into its directory and returns no score (None) instead
of raising, so that the other jobs still run: Hydra's sweepers stop a sweep at a job that raised,
and the Optuna sweeper records a trial without a score as failed and goes on. `FailedJobs`, a Hydra
callback named in conf/config.yaml, runs in the launching process once every job has ended,
whichever launcher ran them (in-process, submitit subprocesses, SLURM), and turns the failed.json
files of this sweep into one line and exit code 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from metarun import run_dir as files
from metarun.errors import MetarunError
from metarun.score import in_results


def objective(results: dict[str, Any]) -> float:
    """What a sweeper maximizes: the best validation accuracy, or minus the best validation MSE.

    Never the test score: hyperparameters chosen on the test episodes would make the test number
    one more validation number. The test result stays in results.json.
    """
    score = in_results(results)
    return score.objective(files.best_val(results, score))


def error_line(error: BaseException) -> str:
    """A MetarunError's own line (problem; fix), or a crash's type and the first line of its message."""
    if isinstance(error, MetarunError):
        return str(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def trial_directories(cfg: DictConfig, trial: Any) -> None:
    """The Optuna sweeper's `custom_search_space` hook: trial N runs in ${hydra.sweep.dir}/N.

    Hydra numbers a sweep's jobs from 0 at every invocation, so a study continued in the same sweep
    directory would send its new trials into its old trials' directories, where metarun refuses a
    different config. Trial numbers are unique within a study. The hook can add an override only as
    a parameter, so the number travels as a parameter with a single value (optimization_results.yaml
    then names the best trial's directory); a hydra.* override stays out of the job's own config.
    """
    trial.suggest_int("hydra.sweep.subdir", trial.number, trial.number)


class CreateSweepDir(Callback):
    """Makes hydra.sweep.dir before the sweeper starts: the Optuna sweeper opens its study's sqlite
    file there (conf/hydra/sweeper/), before any launcher has made the folder, and sqlite makes none."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)


class FailedJobs(Callback):
    """After a sweep: one line naming the jobs that wrote failed.json, and exit code 1."""

    def __init__(self) -> None:
        self.before: dict[Path, tuple[int, int]] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A sweep directory can hold earlier sweeps' jobs (an Optuna study continued in it): what this
        # sweep wrote is what is new or rewritten since now (files are renamed into place: new inodes).
        self.before = job_records(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        written = [
            path for path, stamp in job_records(sweep_dir).items() if self.before.get(path) != stamp
        ]
        failed = [path.parent for path in written if path.name == files.FAILED]
        failed.sort(key=job_order)
        if not failed:
            return
        jobs = len({path.parent for path in written})
        command_line = list(config.hydra.overrides.task)
        described = "; ".join(describe_failure(job_dir, command_line) for job_dir in failed)
        print(f"metarun: {len(failed)} of {jobs} sweep jobs failed: {described}", file=sys.stderr)
        sys.exit(1)


def job_records(sweep_dir: Path) -> dict[Path, tuple[int, int]]:
    """{results.json or failed.json of each job under sweep_dir: (inode, mtime in ns)}."""
    if not sweep_dir.is_dir():
        return {}
    records = {}
    for path in [*sweep_dir.rglob(files.RESULTS), *sweep_dir.rglob(files.FAILED)]:
        stat = path.stat()
        records[path] = (stat.st_ino, stat.st_mtime_ns)
    return records


def job_order(job_dir: Path) -> tuple[int, str]:
    return (int(job_dir.name), "") if job_dir.name.isdigit() else (sys.maxsize, str(job_dir))


def describe_failure(job_dir: Path, command_line: list[str]) -> str:
    """`multirun/.../1 (episode.n_way=1000: <error>)`: the job's own overrides and its error line."""
    record = json.loads(files.failed_file(job_dir).read_text())
    own = " ".join(own_overrides(record["overrides"], command_line))
    where = os.path.relpath(job_dir)
    if where.startswith(".."):
        where = str(job_dir)
    return f"{where} ({own + ': ' if own else ''}{record['error']})"


def own_overrides(job: list[str], command_line: list[str]) -> list[str]:
    """The job's overrides that the command line did not set to the same value: its sweep values and
    search parameters. Compared as values: Hydra hands a job `x=False` for the command line's `x=false`."""
    parser = OverridesParser.create()
    given = {o.key_or_group: o.value() for o in parser.parse_overrides(command_line)}
    absent = object()
    return [
        text
        for text, o in zip(job, parser.parse_overrides(job))
        if given.get(o.key_or_group, absent) != o.value()
    ]
