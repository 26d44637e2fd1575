"""logger=tensorboard (the default): the scalars as TensorBoard events in the run's tb/, and the
hyperparameters with the final scores (`tensorboard --logdir outputs`)."""

from __future__ import annotations

import threading
from typing import Any

from metarun import run_dir as files
from metarun.atomic import write_errors
from metarun.loggers.base import Logger, RunInfo


class TensorBoardLogger(Logger):
    """A write its background thread failed is raised at the next call and at `close`, as a
    metarun.atomic.WriteFailed line naming tb/."""

    name = "tensorboard"

    def start(self, info: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tb_dir = files.tensorboard_dir(info.run_dir)
        self.params = info.params
        quiet_tensorboard_thread_errors()
        with write_errors(self.tb_dir):
            # Events after the step a resumed run continues from are dropped, as in metrics.jsonl.
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=info.resumed_from or None)

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        with write_errors(self.tb_dir):
            for name, value in values.items():
                self.writer.add_scalar(f"{split}/{name}", value, step)

    def result(self, results: dict[str, Any], summary: dict[str, float]) -> None:
        with write_errors(self.tb_dir):
            metrics = {f"hparam/{key}": value for key, value in summary.items()}
            self.writer.add_hparams(self.params, metrics, run_name=".")

    def close(self, status: str = "finished") -> None:
        with write_errors(self.tb_dir):
            self.writer.close()


def quiet_tensorboard_thread_errors() -> None:
    """Leave out the traceback Python prints when TensorBoard's writer thread fails a write.

    The thread keeps the exception and its SummaryWriter raises it in the training thread at the
    next add, flush or close, which the logger reports as one line; the thread's own report would be
    a second, multi-line one. Exceptions of every other thread are reported as before.
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
