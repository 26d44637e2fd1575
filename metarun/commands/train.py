"""`metarun key=value ...`: Hydra composes conf/, the Trainer trains and meta-tests; nothing else.

Under torchrun (`torchrun --nproc_per_node=G -m metarun ...`) every process runs this; they join
one process group first and take rank 0's run directory. What happens when a run does not finish
is `failure_policy`'s, one place for all of it.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from metarun import config  # noqa: F401  (registers the schema that conf/config.yaml names)
from metarun import run_dir as files
from metarun.distributed import Processes
from metarun.errors import MetarunError, warnings_as_lines
from metarun.hydra_errors import one_line_composition_errors
from metarun.lock import RunDirBusy
from metarun.preemption import Stopped
from metarun.sweep import error_line, objective
from metarun.trainer import Trainer


@hydra.main(version_base="1.3", config_path="pkg://metarun.conf", config_name="config")
def run(cfg: DictConfig) -> Optional[float]:
    """Train and meta-test one run; returns the validation score a sweeper optimizes (sweep.objective),
    or None for a sweep job that failed."""
    processes = Processes.from_environment(cfg.device.type.value)
    run_dir = agreed_run_dir(Path(HydraConfig.get().runtime.output_dir), processes)
    with failure_policy(run_dir, processes) as outcome:
        trainer = Trainer(
            cfg, run_dir, processes
        )  # checks the command, data, checkpoint; no writes
        outcome.started = True
        results = trainer.run()
        processes.close()
        if processes.main:
            files.clear_failure(run_dir)
        outcome.score = objective(results)
    return outcome.score


class Outcome:
    """What the run under `failure_policy` got to: started (it may write into its directory), and
    its objective once it finished."""

    started = False
    score: Optional[float] = None


@contextlib.contextmanager
def failure_policy(run_dir: Path, processes: Processes) -> Iterator[Outcome]:
    """How a run that does not finish ends, whatever stopped it:

    - Ctrl-C: exit 130; a stop signal (SIGTERM, a launcher's that did not requeue us): 128 + signal;
      each with the command that resumes from the last checkpoint.
    - Any other error writes failed.json (for the sweep's summary and the report), on rank 0, once
      the run has started or always in a sweep: a bad single command leaves an existing directory
      as it was, and a directory another live process trains is that process's (RunDirBusy).
    - A sweep job then prints the line and returns no score, so that the other jobs run on.
    - A single run prints a MetarunError's line and exits 2 (a command that cannot run as given) or
      1 (errors.RunFailed: a run that failed), removing the directory Hydra made for a run that
      never started; a crash keeps its traceback.
    """
    hydra_cfg = HydraConfig.get()
    sweep_job = hydra_cfg.mode == RunMode.MULTIRUN
    existed = run_dir.exists() and any(run_dir.iterdir())
    resume = (
        f"`metarun ... hydra.run.dir={run_dir}` with the same overrides resumes from its last "
        "checkpoint"
    )
    outcome = Outcome()
    try:
        yield outcome
    except KeyboardInterrupt:
        say(f"interrupted; {resume}", exit_code=130)
    except Stopped as stopped:
        say(f"{stopped}; {resume}", exit_code=128 + stopped.signum)
    except Exception as e:
        line = error_line(e)
        if (sweep_job or outcome.started) and processes.main and not isinstance(e, RunDirBusy):
            # A full disk or a directory that cannot be written refuses failed.json too: the line says so.
            with contextlib.suppress(MetarunError):
                files.record_failure(run_dir, line, list(hydra_cfg.overrides.task))
        if sweep_job:
            if not isinstance(e, MetarunError):
                traceback.print_exc()
            # No score, not NaN: the Optuna sweeper crashes when it tells Optuna 2 a NaN, and
            # records a value that is not a number as a failed trial, and goes on.
            say(f"error: {line}")
            return
        if not isinstance(e, MetarunError):
            raise
        if not existed and run_dir.exists() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # Hydra made it for us; a run that never started leaves nothing behind
        say(f"error: {e}", exit_code=e.exit_code)


def say(line: str, exit_code: Optional[int] = None) -> None:
    """`metarun: <line>` on stderr, then exit with `exit_code` unless it is None."""
    print(f"metarun: {line}", file=sys.stderr)
    if exit_code is not None:
        sys.exit(exit_code)


def agreed_run_dir(mine: Path, processes: Processes) -> Path:
    """Rank 0's run directory on every rank: its name holds the time, which ranks may see differently.
    The directory Hydra made for another rank's time is removed again while it is empty."""
    agreed = Path(processes.agree(str(mine)))
    if agreed != mine and mine.is_dir() and not any(mine.iterdir()):
        mine.rmdir()
    return agreed


@contextlib.contextmanager
def one_line_directory_errors(inside: Callable[..., Any]) -> Iterator[None]:
    """Hydra makes the run (or sweep) directory before the run starts: one it cannot make (under a
    file, on a read-only file system) is one line. An OSError from inside `inside` (the run) keeps
    its traceback."""
    try:
        yield
    except OSError as e:
        code = inside.__wrapped__.__code__
        inside_run = any(frame.f_code is code for frame, _ in traceback.walk_tb(e.__traceback__))
        if inside_run or not e.filename:
            raise
        say(
            f"error: cannot make {e.filename} ({e.strerror}); choose another hydra.run.dir "
            "(hydra.sweep.dir for a sweep)",
            exit_code=2,
        )


def main() -> None:
    warnings_as_lines("metarun")
    with one_line_composition_errors(), one_line_directory_errors(run):
        run()


if __name__ == "__main__":
    main()
