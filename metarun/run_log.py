"""Where a run's numbers go: metrics.jsonl, TensorBoard scalars and hparams, the console."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from metarun import run_dir as files
from metarun.atomic import write_atomically, write_errors


class RunLog:
    """Appends one JSON line per logged step and mirrors each scalar to TensorBoard.

    Started at `resume_step`, it drops whatever a killed run logged after its last checkpoint, so
    a resumed run's logs read as if it had never stopped. A write that fails, to metrics.jsonl or
    to the TensorBoard events (which a background thread writes: the failure is raised at the next
    call, and at `close`), raises metarun.atomic.WriteFailed naming the file or folder.
    """

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.metrics_path = files.metrics_file(run_dir)
        self.tb_dir = files.tensorboard_dir(run_dir)
        self._truncate_after(resume_step)
        quiet_tensorboard_thread_errors()
        with write_errors(self.tb_dir):
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=resume_step or None)

    def _truncate_after(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if _step(line) <= step]
        # Atomically: a kill or a full disk while rewriting must not lose the lines before `step`.
        write_atomically(
            self.metrics_path, lambda f: f.write("".join(line + "\n" for line in kept).encode())
        )

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        # A line cut short by a full disk is dropped when the run resumes (_step).
        with write_errors(self.metrics_path), self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        with write_errors(self.tb_dir):
            for name, value in values.items():
                self.writer.add_scalar(f"{split}/{name}", value, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        with write_errors(self.tb_dir):
            self.writer.add_hparams(hparams, metrics, run_name=".")

    def close(self) -> None:
        """Flush and close the TensorBoard writer: a write its thread failed is raised here at the latest."""
        with write_errors(self.tb_dir):
            self.writer.close()


def quiet_tensorboard_thread_errors() -> None:
    """Leave out the traceback Python prints when TensorBoard's writer thread fails a write.

    The thread keeps the exception and its SummaryWriter raises it in the training thread at the
    next add, flush or close, which RunLog reports as one line; the thread's own report would be a
    second, multi-line one. Exceptions of every other thread are reported as before.
    """
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args: Any) -> None:
        if type(args.thread).__module__.startswith("tensorboard.") and isinstance(
            args.exc_value, Exception
        ):
            return
        previous(args)

    hook.quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _step(line: str) -> float:
    """The step a metrics line was logged at; a line cut short by a kill counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
