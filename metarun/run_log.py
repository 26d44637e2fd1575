"""Where a run's numbers go: metrics.jsonl, TensorBoard scalars and hparams, the console."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    """Appends one JSON line per logged step and mirrors each scalar to TensorBoard.

    Started at `resume_step`, it drops whatever a killed run logged after its last checkpoint, so
    a resumed run's logs read as if it had never stopped.
    """

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.metrics_path = run_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step or None)

    def _truncate_after(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if _step(line) <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        for name, value in values.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        self.writer.add_hparams(hparams, metrics, run_name=".")

    def close(self) -> None:
        self.writer.close()


def _step(line: str) -> float:
    """The step a metrics line was logged at; a line cut short by a kill counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
