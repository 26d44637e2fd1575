"""Timing variants against each other on a noisy machine: interleaved rounds, medians, spreads.

Timing each variant once, one after another, lets a slow minute (another job, a frequency change)
land on one variant only: on a shared 2-core machine identical code measured 7.2 and 9.2 tasks/s in
one run. Here every round times every variant once, in an order that rotates from round to round,
so a disturbance falls on all of them; a variant's time is the median over rounds, and a ratio
between two variants is taken within each round (where they met the same conditions) and then its
median over rounds, with the spread (min-max over rounds) printed beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """`names` rotated left by `round_index`: over len(names) rounds each takes every position once."""
    shift = round_index % len(names)
    return list(names[shift:]) + list(names[:shift])


def interleaved_rounds(
    steps: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of one call of each of `steps`, per round: {name: [seconds in round 0, 1, ...]}.

    Each step is called `warmup` times first (in order), then once per round in rotating order.
    `sync` runs before reading the clock (e.g. torch.cuda.synchronize).
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in rotated(names, r):
            sync()
            start = clock()
            steps[name]()
            sync()
            seconds[name].append(clock() - start)
    return seconds


@dataclass(frozen=True)
class Spread:
    """A median over rounds and the smallest and largest value."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def relative_width(self) -> float:
        """(high - low) / median: how far apart the rounds were."""
        return (self.high - self.low) / self.median


def speed_ratio(seconds: dict[str, list[float]], name: str, reference: str) -> Spread:
    """How many times faster `name` ran than `reference`, round by round (reference's seconds over
    name's in the same round): their median and spread."""
    return Spread.of([ref / own for own, ref in zip(seconds[name], seconds[reference])])
