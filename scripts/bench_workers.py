"""Test episodes on task workers (`algorithm.task_workers`): episodes per second and peak memory
of `metarun.evaluation.evaluate_batch` with `task_workers=1` (the learner's own `evaluate` on the
whole batch, every intra-op thread) and on one worker thread per core, one intra-op thread and one
episode at a time each; the last column marks the one `task_workers=auto` takes
(metarun.task_workers.evaluation_pays).

What: one batch of --batch (16) synthetic Omniglot-shaped episodes (scripts/bench.py's: 5-way
1-shot, 15 queries per class, 1x28x28, seeded) scored by a Conv4 learner in eval mode: MAML with 3
test-time inner steps (its default) and with 10, and ProtoNet. The training step's counterpart is
scripts/bench.py's "one worker" and "one worker per core" rows.
How:
  - Speed: both variants in this process, after a warm-up batch each, timed in interleaved rounds
    (scripts/rounds.py): episodes/s from the median round with the min-max spread, and the ratio
    workers / one after another taken within each round.
  - Memory: each variant in a process of its own (glibc keeping freed memory, as metarun-eval sets
    it on the CPU): the growth of its peak RSS (VmHWM) over --rounds batches.
  - The scores of the two variants are compared: equal up to float32 rounding (oneDNN's kernels
    split their sums by thread), so a differing episode's accuracy is printed, not asserted.

    python scripts/bench_workers.py [--rounds 7] [--batch 16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (  # noqa: E402
    Family,
    initial_model,
    metarun_learner,
    peak_bytes,
    synthetic_tasks,
)
from rounds import Spread, interleaved_rounds, speed_ratio  # noqa: E402

from metarun.device import keep_freed_memory  # noqa: E402
from metarun.evaluation import evaluate_batch  # noqa: E402
from metarun.task_workers import evaluation_pays  # noqa: E402

LEARNERS = {"MAML, 3 test steps": 3, "MAML, 10 test steps": 10, "ProtoNet": 0}
VARIANTS = {
    "the learner's evaluate (task_workers=1)": 1,
    "one worker per core (task_workers=C)": torch.get_num_threads(),
}
MIB = 2**20


def learner(name: str) -> nn.Module:
    """scripts/bench.py's learner of the row `name`, in eval mode (`score` sets its task workers)."""
    steps = LEARNERS[name]
    family = Family("MAML", adaptation_steps=1) if steps else Family("ProtoNet")
    settings = {"eval_adaptation_steps": steps} if steps else {}
    model = initial_model(family)
    return metarun_learner(family, model, torch.device("cpu"), **settings).eval()


def score(built: nn.Module, tasks, task_workers) -> torch.Tensor:
    built.task_workers = task_workers
    return evaluate_batch(built, tasks, contextlib.nullcontext)[1]


def memory(name: str, variant: str, batches: int, batch: int) -> None:
    """This process: `batches` batches of one variant; prints its peak RSS growth as JSON."""
    keep_freed_memory()
    built, tasks = learner(name), synthetic_tasks(batch, torch.device("cpu"), [1, 28, 28])
    start = peak_bytes(torch.device("cpu"))
    for _ in range(batches):
        score(built, tasks, VARIANTS[variant])
    print(json.dumps((peak_bytes(torch.device("cpu")) - start) / MIB))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16, help="episodes per test batch")
    parser.add_argument("--memory", nargs=2, help=argparse.SUPPRESS)  # internal: LEARNER VARIANT
    args = parser.parse_args()
    if args.memory:
        memory(*args.memory, args.rounds, args.batch)
        return
    keep_freed_memory()
    print(f"threads {torch.get_num_threads()}, {args.batch} episodes a batch, {args.rounds} rounds")
    print(
        "| learner | episodes | episodes/s (median) | spread | vs task_workers=1 | "
        "peak mem growth (MiB) | episodes whose accuracy differs | auto's choice |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    tasks = synthetic_tasks(args.batch, torch.device("cpu"), [1, 28, 28])
    for name in LEARNERS:
        built = learner(name)
        steps = {
            variant: (lambda value=value, built=built: score(built, tasks, value))
            for variant, value in VARIANTS.items()
        }
        seconds = interleaved_rounds(steps, args.rounds, warmup=1)
        scores = {variant: score(built, tasks, value) for variant, value in VARIANTS.items()}
        first, workers = VARIANTS
        chosen = workers if evaluation_pays(built) else first
        for variant in VARIANTS:
            rate = Spread.of([args.batch / s for s in seconds[variant]])
            ratio = speed_ratio(seconds, variant, first)
            grown = subprocess.run(
                [sys.executable, __file__, "--memory", name, variant, "--rounds", str(args.rounds)]
                + ["--batch", str(args.batch)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[-1]
            differs = int((scores[variant] != scores[first]).sum())
            print(
                f"| {name} | {variant} | {rate.median:.1f} | {rate.low:.1f}-{rate.high:.1f} | "
                f"{ratio.median:.2f}x ({ratio.low:.2f}-{ratio.high:.2f}) | {float(grown):.0f} | "
                f"{differs} of {args.batch} | {'auto' if variant == chosen else ''} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
