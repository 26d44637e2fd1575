"""Where one metarun MAML meta-training step spends its time, op by op (CPU).

What: one second-order MAML step (Conv4-64, 5-way 1-shot, 15 queries per class, 1x28x28, inner_lr
0.4, `--steps` inner steps, `--meta-batch` tasks, Adam outer step) on scripts/bench.py's seeded
synthetic meta-batch, backpropagated task by task as metarun/trainer.py's train_step does it: for
each chunk of `learner.task_chunks(tasks)` (one task each on the CPU), `learner(chunk)[0] * share`
then `.backward()`.
How: 2 warm-up steps, then one step under `torch.profiler.profile(activities=[CPU])`. Prints the
profiler's `key_averages()` table (by self CPU time, 15 rows), then a markdown table of the top ops
with their share of the step's self CPU time and their calls per task. The share left to
"(Python and dispatch between ops)" is the step's wall time minus all ops' self CPU time.

    python scripts/profile_step.py [--steps 1|5] [--meta-batch 32] [--threads 1] [--rows 12]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py: the benchmark's data, network and settings)

from metarun.algorithms.maml import MAML  # noqa: E402
from metarun.models.conv4 import Conv4  # noqa: E402


def make_learner(steps: int) -> MAML:
    """metarun's second-order MAML (per-task loop) over bench.py's seeded initial Conv4 and head."""
    torch.manual_seed(bench.SEED)  # as bench.initial_model: the backbone, then the head
    backbone = Conv4(in_channels=bench.IMAGE_SHAPE[0], image_size=bench.IMAGE_SHAPE[-1])
    return MAML(backbone, bench.N_WAY, inner_lr=bench.INNER_LR, adaptation_steps=steps, first_order=False,
                task_batching="loop")


def train_step(learner: MAML, tasks, optimizer: torch.optim.Optimizer) -> None:
    """As Trainer.train_step without AMP, clipping or metrics: backward chunk by chunk, then Adam."""
    optimizer.zero_grad(set_to_none=True)
    for chunk in learner.task_chunks(tasks):
        loss, _ = learner(chunk)
        (loss * (len(chunk) / len(tasks))).backward()
    optimizer.step()


def markdown(events, wall_us: float, n_tasks: int, rows: int) -> str:
    """Op | self CPU % of the step's wall time | calls per task, for the `rows` costliest ops."""
    events = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    lines = ["| op | self CPU % | calls per task |", "|---|---:|---:|"]
    for e in events[:rows]:
        lines.append(f"| `{e.key}` | {100 * e.self_cpu_time_total / wall_us:.1f} | {e.count / n_tasks:.0f} |")
    rest = sum(e.self_cpu_time_total for e in events[rows:])
    lines.append(f"| (other ops) | {100 * rest / wall_us:.1f} | |")
    between = wall_us - sum(e.self_cpu_time_total for e in events)
    lines.append(f"| (Python and dispatch between ops) | {100 * between / wall_us:.1f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1, help="inner (adaptation) steps")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--rows", type=int, default=12, help="rows of the markdown table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tasks = bench.synthetic_tasks(args.meta_batch, torch.device("cpu"), bench.IMAGE_SHAPE)
    learner = make_learner(args.steps)
    optimizer = torch.optim.Adam(learner.parameters(), lr=bench.META_LR)
    for _ in range(2):
        train_step(learner, tasks, optimizer)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        train_step(learner, tasks, optimizer)
        wall_us = (time.perf_counter() - start) * 1e6
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"\nMAML 2nd order, {args.steps} inner step(s), meta-batch {args.meta_batch}, "
          f"{torch.get_num_threads()} thread(s): step {wall_us / 1e6:.2f} s under the profiler "
          f"({args.meta_batch / (wall_us / 1e6):.1f} tasks/s)\n")
    print(markdown(list(averages), wall_us, args.meta_batch, args.rows))


if __name__ == "__main__":
    main()
