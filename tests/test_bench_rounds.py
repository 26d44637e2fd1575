"""scripts/rounds.py, the benchmark's interleaving: on trivial functions with a clock we control."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "rounds", Path(__file__).parents[1] / "scripts" / "rounds.py"
)
rounds = sys.modules["rounds"] = importlib.util.module_from_spec(
    spec
)  # a script, not part of the package
spec.loader.exec_module(rounds)


class FakeMachine:
    """A clock that each step advances by its cost times the machine's current slowness."""

    def __init__(self, costs: dict[str, float]):
        self.now, self.costs, self.slowness, self.calls = 0.0, costs, 1.0, []

    def step(self, name: str):
        def run() -> None:
            self.calls.append(name)
            self.now += self.costs[name] * self.slowness

        return run

    def clock(self) -> float:
        return self.now


def test_every_round_times_every_variant_once_in_rotating_order():
    machine = FakeMachine({"a": 1.0, "b": 2.0, "c": 3.0})
    seconds = rounds.interleaved_rounds(
        {name: machine.step(name) for name in "abc"}, rounds=3, warmup=2, clock=machine.clock
    )
    assert machine.calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, in order
    assert machine.calls[6:] == [
        "a",
        "b",
        "c",
        "b",
        "c",
        "a",
        "c",
        "a",
        "b",
    ]  # each position once per variant
    assert seconds == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}


def test_a_slow_round_moves_the_times_but_not_the_ratio_within_rounds():
    machine = FakeMachine({"fast": 1.0, "slow": 1.5})
    steps = {name: machine.step(name) for name in ("fast", "slow")}

    def clock() -> float:  # rounds 1 and 2 (calls 4 to 7 after 2 warm-up calls) run 3x slower
        machine.slowness = 3.0 if 4 <= len(machine.calls) < 8 else 1.0
        return machine.clock()

    seconds = rounds.interleaved_rounds(steps, rounds=5, warmup=1, clock=clock)
    assert max(seconds["fast"]) == pytest.approx(3.0)  # the disturbance shows in the raw times...
    ratio = rounds.speed_ratio(seconds, "fast", "slow")
    assert (
        ratio.median == pytest.approx(1.5)
        and ratio.low == pytest.approx(1.5)
        and ratio.high == pytest.approx(1.5)
    )
    assert rounds.Spread.of(seconds["fast"]).median == pytest.approx(
        1.0
    )  # ...and not in the median of 5 rounds


def test_spread_is_the_median_and_the_extremes():
    spread = rounds.Spread.of([4.0, 1.0, 2.0, 10.0, 3.0])
    assert (spread.median, spread.low, spread.high) == (3.0, 1.0, 10.0)
    assert spread.relative_width() == pytest.approx(3.0)
