"""What every logger receives, and from where: the run's description (`RunInfo`, once at the start),
its scalars at their steps, and its test result and files at the end. `metarun.run_log.RunLog` is
the one place that sends them; a logger only translates them into its tracker's calls."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from metarun import run_dir as files
from metarun.errors import MetarunError


@dataclass
class RunInfo:
    """The run as a tracker names and describes it."""

    run_dir: Path
    name: str  # the run directory's name; a sweep job's: <sweep>/<job>
    params: dict[str, Any]  # the composed config, flattened (metarun.config.hparams)
    overrides: list[str] = field(default_factory=list)  # the command line's, as Hydra parsed them
    sweep: Optional[str] = None  # the sweep directory of a `-m` job, else None
    varying: list[str] = field(default_factory=list)  # the keys the sweep varies
    git_commit: Optional[str] = None  # of the metarun code, where it is a git checkout
    resumed_from: int = 0  # the step a resumed run continues from (0: a new run)

    def tags(self) -> dict[str, str]:
        """Tags every tracker with tags sets: the run directory, the commit, the overrides."""
        tags = {"run_dir": str(self.run_dir)}
        if self.git_commit:
            tags["git_commit"] = self.git_commit
        if self.sweep:
            tags["sweep"] = self.sweep
        for line in self.overrides:
            key, _, value = line.partition("=")
            tags[f"override.{key.lstrip('+~')}"] = value
        return tags


class Logger:
    """A tracker's side of a run. `remote`: the tracker keeps every record it was sent (MLflow,
    W&B), so a resumed run does not send it again what it has. `check` runs before the trainer writes anything (a missing
    package, a tracking server that does not answer: a MetarunError line); `start` opens or
    resumes the tracker's run; the others send what their names say."""

    name = ""
    remote = False

    def check(self) -> None:
        pass

    def start(self, info: RunInfo) -> None:
        pass

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        pass

    def result(self, results: dict[str, Any], summary: dict[str, float]) -> None:
        """The final test: `results` is results.json, `summary` its scalars as the trackers keep them
        (test score, CI, best validation score, ...)."""

    def artifacts(self, paths: list[Path]) -> None:
        pass

    def close(self, status: str = "finished") -> None:
        """`status`: "finished", "failed" (an error) or "stopped" (a signal; it resumes later)."""


def needs(package: str, logger: str) -> Any:
    """`import package`, or one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise MetarunError(
            f"logger={logger} needs the {package} package, which is not installed; "
            f"pip install 'metarun[{logger}]' (or choose another logger)"
        ) from None


def git_commit(directory: Path) -> Optional[str]:
    """The commit checked out where `directory` lies, with `-dirty` for uncommitted changes, or None
    where it is not a git checkout (an installed wheel)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def remembered(run_dir: Path, logger: str) -> Optional[dict[str, Any]]:
    """What `logger` kept in the run's loggers.json (its tracker's run id), or None."""
    path = files.loggers_file(run_dir)
    if not path.exists():
        return None
    return json.loads(path.read_text()).get(logger)


def remember(run_dir: Path, logger: str, record: dict[str, Any]) -> None:
    """Keep `record` for `logger` in the run's loggers.json, for a resumed run to continue from."""
    path = files.loggers_file(run_dir)
    kept = json.loads(path.read_text()) if path.exists() else {}
    files.write_json(path, {**kept, logger: record})
