"""Meta-training progress: tqdm's bar on a terminal, plain lines in a batch job's log.

tqdm turns itself off when its stream is not a terminal (SLURM, nohup, CI), which left a long run
silent until its first validation. Without a terminal, `Progress` prints one line to stdout every
`every` steps (train.log_every) or every `seconds`, whichever comes first, so that `tail -f` of a
job's log tells how far it is:

    step 40/3000  loss 0.512  acc 0.812  tasks/s 64  elapsed 01:02  eta 1:16:30
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(
        self, total: int, initial: int, every: int, seconds: float = 60.0, enabled: bool = True
    ):
        self.total, self.initial, self.every, self.seconds = total, initial, every, seconds
        self.terminal = enabled and sys.stderr.isatty()
        self.lines = enabled and not self.terminal
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="meta-train",
            dynamic_ncols=True,
            disable=not self.terminal,
        )
        self.start = self.last_line = time.monotonic()
        self.values: dict[str, float] = {}

    def update(self, step: int, values: dict[str, float] | None = None) -> None:
        """Step `step` is done; `values` (loss, accuracy, tasks/s, ...) when it logged them."""
        if values is not None:
            self.values = values
        self.bar.update()
        if values is not None and self.terminal:
            self.bar.set_postfix(values)
        now = time.monotonic()
        if self.lines and (
            step % self.every == 0 or step == self.total or now - self.last_line >= self.seconds
        ):
            self.last_line = now
            print(self.line(step, now - self.start), flush=True)

    def line(self, step: int, elapsed: float) -> str:
        done = step - self.initial
        eta = tqdm.format_interval(elapsed / done * (self.total - step)) if done else "?"
        values = [f"{name} {value:.3g}" for name, value in self.values.items()]
        return "  ".join(
            [
                f"step {step}/{self.total}",
                *values,
                f"elapsed {tqdm.format_interval(elapsed)}",
                f"eta {eta}",
            ]
        )

    def write(self, line: str) -> None:
        """A line (e.g. a validation result) above the bar, or in the log."""
        if self.terminal:
            tqdm.write(line)
        elif self.lines:
            print(line, flush=True)

    def close(self) -> None:
        self.bar.close()
