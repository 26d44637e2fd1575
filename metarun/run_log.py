"""Where a run's numbers go, from one place: metrics.jsonl, and every logger of the `logger` group
(metarun.loggers: TensorBoard, CSV, MLflow, Weights & Biases) with the same records."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from metarun import run_dir as files
from metarun.atomic import write_atomically, write_errors
from metarun.errors import MetarunError
from metarun.loggers.base import Logger, RunInfo
from metarun.loggers.tensorboard import TensorBoardLogger
from metarun.sweep import error_line


class RunLog:
    """Appends one JSON line per logged step to metrics.jsonl and sends the same scalars to each
    logger; at the end, the test result and the run's files.

    Started at `resume_step`, it drops whatever a killed run logged after its last checkpoint, so
    a resumed run's metrics.jsonl reads as if it had never stopped. The loggers whose trackers keep
    what they were sent (MLflow, W&B) are not sent again the steps that the killed run had already
    sent them, up to the last line it wrote: a resume continues exactly, so those equal what it would
    send. A write that fails, to metrics.jsonl or to a file logger's file, raises
    metarun.atomic.WriteFailed naming it. A tracker that fails in the middle of a run (its server
    went away) says so in one line and is left out from then on: training goes on, and
    metrics.jsonl stays complete.
    """

    def __init__(
        self,
        run_dir: Path,
        resume_step: int = 0,
        loggers: Optional[Sequence[Logger]] = None,
        info: Optional[RunInfo] = None,
    ):
        self.metrics_path = files.metrics_file(run_dir)
        self.sent_step = self._truncate_after(resume_step)
        self.loggers = list(loggers) if loggers is not None else [TensorBoardLogger()]
        info = info or RunInfo(Path(run_dir), Path(run_dir).name, params={})
        info.resumed_from = resume_step
        for logger in self.loggers:
            logger.start(info)

    def _truncate_after(self, step: int) -> int:
        """Drop the lines after `step`; returns the last step the file had (0: none)."""
        if not self.metrics_path.exists():
            return 0
        lines = self.metrics_path.read_text().splitlines()
        steps = [_step(line) for line in lines]
        kept = [line for line, s in zip(lines, steps) if s <= step]
        # Atomically: a kill or a full disk while rewriting must not lose the lines before `step`.
        write_atomically(
            self.metrics_path, lambda f: f.write("".join(line + "\n" for line in kept).encode())
        )
        return int(max((s for s in steps if s != float("inf")), default=0))

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        # A line cut short by a full disk is dropped when the run resumes (_step).
        with write_errors(self.metrics_path), self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        for logger in list(self.loggers):
            if step <= self.sent_step and logger.remote:
                continue
            self._send(logger, "scalars", split, step, values)

    def finish(self, results: dict[str, Any], summary: dict[str, float], paths: list[Path]) -> None:
        """The test result (results.json and its scalars) and the run's files, to every logger."""
        for logger in list(self.loggers):
            self._send(logger, "result", results, summary)
        existing = [path for path in paths if path.exists()]
        for logger in list(self.loggers):
            self._send(logger, "artifacts", existing)

    def close(self, status: str = "finished") -> None:
        """Close every logger (TensorBoard: a write its thread failed is raised here at the latest);
        `status` ("finished", "failed", "stopped") is what the trackers mark the run."""
        errors = []
        for logger in self.loggers:
            try:
                logger.close(status)
            except Exception as e:  # every logger is closed, then the first failure is raised
                errors.append(e)
        if errors:
            raise errors[0]

    def _send(self, logger: Logger, call: str, *args: Any) -> None:
        try:
            getattr(logger, call)(*args)
        except MetarunError:
            raise  # a file of the run that cannot be written: the run stops, as for metrics.jsonl
        except Exception as e:
            if not logger.remote:  # a file logger's failure is the run's, as metrics.jsonl's
                raise
            warnings.warn(
                f"logger={logger.name} failed ({error_line(e)}); it is left "
                f"out for the rest of the run, whose numbers are all in {self.metrics_path.name}",
                stacklevel=2,
            )
            self.loggers.remove(logger)


def _step(line: str) -> float:
    """The step a metrics line was logged at; a line cut short by a kill counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
