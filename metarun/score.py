"""What a task is scored by: its name in the run's files, which way is better, how it prints.

A classification task is scored by accuracy (a fraction, higher is better, printed in %), a
regression task by the mean squared error of its query predictions (lower is better). The trainer,
the evaluation, `metarun-eval`, the sweep's objective and the report look the score up here rather
than comparing its name: results.json holds it under `test_<name>` and `best_val_<name>`,
metrics.jsonl and test_episodes.json under `<name>` (`metarun.run_dir`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor


@dataclass(frozen=True)
class Score:
    name: str  # "accuracy" or "mse": the key in metrics and results
    higher_is_better: bool
    short: str  # in log lines: "acc", "mse"
    percent: bool  # printed and tabled as %

    @property
    def worst(self) -> float:
        """What any real score beats: the best validation score before the first validation."""
        return -math.inf if self.higher_is_better else math.inf

    def better(self, score: float, than: float) -> bool:
        return score > than if self.higher_is_better else score < than

    def best(self, scores: list[float]) -> float:
        return max(scores) if self.higher_is_better else min(scores)

    def objective(self, score: float) -> float:
        """What a sweeper maximizes: the score, or minus an error."""
        return score if self.higher_is_better else -score

    def value(self, score: float) -> str:
        """'97.1%' or '0.1234'."""
        return f"{100 * score:.1f}%" if self.percent else f"{score:.4f}"

    def describe(self, result: dict[str, Any]) -> str:
        """'acc 97.1% +- 0.3' or 'mse 0.1234 +- 0.0100': a validation or test result for a log line."""
        if self.percent:
            return f"{self.short} {100 * result[self.name]:.1f}% +- {100 * result['ci95']:.1f}"
        return f"{self.short} {result[self.name]:.4f} +- {result['ci95']:.4f}"

    def table(self, value: Optional[float], spread: Optional[float] = None) -> str:
        """A report cell: '97.1 ± 0.3' (points of %) or '0.1234 ± 0.01'; '-' for none."""
        if value is None:
            return "-"
        if self.percent:
            return f"{100 * value:.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "")
        return f"{value:.4g}" + (f" ± {spread:.2g}" if spread is not None else "")

    @property
    def scale(self) -> float:
        """Multiplies a fraction into what tables and plots show (100 for %)."""
        return 100.0 if self.percent else 1.0

    @property
    def label(self) -> str:
        """A column or axis name: 'accuracy (%)', 'mse'."""
        return f"{self.name} (%)" if self.percent else self.name

    def difference(self) -> str:
        """How a difference B - A of this score is said, after its number."""
        return "points of accuracy" if self.percent else self.name

    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else f"lower {self.name} is better"


ACCURACY = Score("accuracy", higher_is_better=True, short="acc", percent=True)
MSE = Score("mse", higher_is_better=False, short="mse", percent=False)
SCORES = {score.name: score for score in (ACCURACY, MSE)}


def of_targets(targets: Tensor) -> Score:
    """A task's score from its query targets: class labels (integers) are classified, real-valued
    targets `[..., M, 1]` regressed (also under vmap, where only the dtype is known)."""
    return MSE if targets.is_floating_point() else ACCURACY


def named(name: Any) -> Optional[Score]:
    """The score called `name` in a run's files, or None for a name metarun does not write."""
    return SCORES.get(name) if isinstance(name, str) else None


def in_results(results: dict[str, Any]) -> Optional[Score]:
    """The score a results.json holds (its `test_<name>` key), or None."""
    return next((score for score in SCORES.values() if f"test_{score.name}" in results), None)
