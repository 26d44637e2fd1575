"""`metarun key=value ...`: Hydra composes conf/, the Trainer trains and meta-tests; nothing else.

Under torchrun (`torchrun --nproc_per_node=G -m metarun ...`) every process runs this; they join
one process group first and take rank 0's run directory.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from metarun import config  # noqa: F401  (registers the schema that conf/config.yaml names)
from metarun.distributed import Processes
from metarun.errors import MetarunError, warnings_as_lines
from metarun.hydra_errors import one_line_composition_errors
from metarun.lock import RunDirBusy
from metarun.preemption import Stopped
from metarun.sweep import clear_failure, error_line, objective, record_failure
from metarun.trainer import Trainer


@hydra.main(version_base="1.3", config_path="pkg://metarun.conf", config_name="config")
def run(cfg: DictConfig) -> float | None:
    """Train and meta-test one run; returns the validation score a sweeper optimizes (sweep.objective),
    or None for a sweep job that failed."""
    hydra_cfg = HydraConfig.get()
    processes = Processes.from_environment(cfg.device.type.value)
    run_dir = agreed_run_dir(Path(hydra_cfg.runtime.output_dir), processes)
    sweep_job = hydra_cfg.mode == RunMode.MULTIRUN
    existed = run_dir.exists() and any(run_dir.iterdir())
    trainer = None
    resume = f"`metarun ... hydra.run.dir={run_dir}` with the same overrides resumes from its last checkpoint"
    try:
        trainer = Trainer(
            cfg, run_dir, processes
        )  # checks the command, the data and any checkpoint; writes nothing
        results = trainer.run()
        processes.close()
    except KeyboardInterrupt:
        print(f"metarun: interrupted; {resume}", file=sys.stderr)
        sys.exit(130)
    except Stopped as stopped:  # SIGTERM, or a launcher's signal that did not requeue us
        print(f"metarun: {stopped}; {resume}", file=sys.stderr)
        sys.exit(128 + stopped.signum)
    except Exception as e:
        # failed.json lets the sweep's summary (sweep.FailedJobs) and a report show the failure. A single
        # run writes it only once training started: a bad command leaves an existing directory as it was.
        # A directory that another live process trains is that process's: nothing is written there.
        line = error_line(e)
        if (sweep_job or trainer is not None) and processes.main and not isinstance(e, RunDirBusy):
            # A full disk or a directory that cannot be written refuses failed.json too: the line says so.
            with contextlib.suppress(MetarunError):
                record_failure(run_dir, line, list(hydra_cfg.overrides.task))
        if sweep_job:  # one bad sweep point must not stop the others
            if not isinstance(e, MetarunError):
                traceback.print_exc()
            print(f"metarun: error: {line}", file=sys.stderr)
            # Not NaN: the Optuna sweeper crashes when it tells Optuna 2 a NaN. A value that is not a
            # number it records as a failed trial, and goes on.
            return None
        if not isinstance(e, MetarunError):
            raise
        if not existed and run_dir.exists() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # Hydra made it for us; a run that never started leaves nothing behind
        print(f"metarun: error: {e}", file=sys.stderr)
        sys.exit(
            e.exit_code
        )  # 2: a command that cannot run as given; 1: a run that failed (errors.RunFailed)
    if processes.main:
        clear_failure(run_dir)
    return objective(results)


def agreed_run_dir(mine: Path, processes: Processes) -> Path:
    """Rank 0's run directory on every rank: its name holds the time, which ranks may see differently.
    The directory Hydra made for another rank's time is removed again while it is empty."""
    agreed = Path(processes.agree(str(mine)))
    if agreed != mine and mine.is_dir() and not any(mine.iterdir()):
        mine.rmdir()
    return agreed


@contextlib.contextmanager
def one_line_directory_errors() -> Iterator[None]:
    """Hydra makes the run (or sweep) directory before the run starts: one it cannot make (under a
    file, on a read-only file system) is one line. An OSError from inside a run keeps its traceback."""
    try:
        yield
    except OSError as e:
        inside_run = any(
            frame.f_code is run.__wrapped__.__code__
            for frame, _ in traceback.walk_tb(e.__traceback__)
        )
        if inside_run or not e.filename:
            raise
        print(
            f"metarun: error: cannot make {e.filename} ({e.strerror}); choose another hydra.run.dir "
            "(hydra.sweep.dir for a sweep)",
            file=sys.stderr,
        )
        sys.exit(2)


def main() -> None:
    warnings_as_lines("metarun")
    with one_line_composition_errors(), one_line_directory_errors():
        run()


if __name__ == "__main__":
    main()
