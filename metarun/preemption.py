"""Stopping a run cleanly when the system asks: SIGTERM, and a batch launcher's pre-timeout signal.

A signal handler only records the signal; the training loop reads it between steps, writes
`last.pt` there (never inside the handler, so a signal during a checkpoint write cannot cut the
file short), and then hands the signal on: to the handler that was installed before ours, which
under submitit (Hydra's SLURM and local launchers) is submitit's own — it asks the launcher to
resubmit the same job, requeues it and exits — or, without one, by raising `Stopped`, which the
command turns into an exit status and a line saying how to resume.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

# submitit's pre-timeout and preemption signal: SIGUSR2 unless $SUBMITIT_PREEMPT_SIGNAL names another.
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"


class Stopped(Exception):
    """The run stopped on a signal after saving checkpoints/last.pt; the same command resumes it."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoints/last.pt holds it"
        )


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM (what `kill`, SLURM at preemption and torchrun send) and the launcher's pre-timeout signal."""
    name = os.environ.get(PREEMPT_SIGNAL_ENV, "USR2")
    preempt = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", signal.SIGUSR2)
    return tuple(dict.fromkeys((signal.SIGTERM, preempt)))


class StopRequests:
    """While active (a context manager), the stop signals set `requested` instead of acting at once.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in stop_signals():
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _record(self, signum: int, frame: Any) -> None:
        self.requested = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def hand_over(self, step: int) -> None:
        """After last.pt is written: let the previous handler act on the signal (submitit requeues
        and exits there), then raise Stopped for whoever runs us."""
        signum = self.requested
        assert signum is not None
        previous: Callable | int | None = self._previous.get(signum)
        self._restore()
        if callable(previous):
            previous(signum, None)
        raise Stopped(signum, step)
