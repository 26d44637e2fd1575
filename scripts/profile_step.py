"""Where one metarun MAML meta-training step spends its time, op by op (CPU).

What: one second-order MAML step (Conv4-64, 5-way 1-shot, 15 queries per class, 1x28x28, inner_lr
0.4, `--steps` inner steps, `--meta-batch` tasks, Adam outer step) on scripts/bench.py's seeded
synthetic meta-batch, built as bench.py's "metarun" variant: the default settings, the
meta-gradient accumulated task by task by metarun.trainer.meta_backward, in a process whose freed
memory glibc keeps (metarun.device.keep_freed_memory, as the trainer sets it on the CPU).
How: 2 warm-up steps, then one step under `torch.profiler.profile(activities=[CPU])`. Prints the
profiler's `key_averages()` table (by self CPU time, 15 rows), then a markdown table of the top ops
with their share of the step's wall time and their calls per task. The share left to
"(Python and dispatch between ops)" is the step's wall time minus all ops' self CPU time. Also
prints the minor page faults of the last warm-up step (the profiler's own buffers would add to a
profiled step's). `--glibc-default` leaves glibc's settings alone: it then returns the freed
memory of large tensors to the kernel (mmap and heap trimming), and the next op writing a fresh
tensor of that size pays the page faults inside its own self CPU time.

    python scripts/profile_step.py [--steps 1|5] [--meta-batch 32] [--threads N] [--rows 12] [--glibc-default]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py: the benchmark's data, network and variants)

from metarun.device import keep_freed_memory  # noqa: E402


def markdown(events, wall_us: float, n_tasks: int, rows: int) -> str:
    """Op | self CPU % of the step's wall time | calls per task, for the `rows` costliest ops."""
    events = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    lines = ["| op | self CPU % | calls per task |", "|---|---:|---:|"]
    for e in events[:rows]:
        lines.append(
            f"| `{e.key}` | {100 * e.self_cpu_time_total / wall_us:.1f} | {e.count / n_tasks:.0f} |"
        )
    rest = sum(e.self_cpu_time_total for e in events[rows:])
    lines.append(f"| (other ops) | {100 * rest / wall_us:.1f} | |")
    between = wall_us - sum(e.self_cpu_time_total for e in events)
    lines.append(f"| (Python and dispatch between ops) | {100 * between / wall_us:.1f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1, help="inner (adaptation) steps")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--rows", type=int, default=12, help="rows of the markdown table")
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="do not keep freed memory in the process (the trainer does, on the CPU)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.glibc_default:
        keep_freed_memory()

    cpu = torch.device("cpu")
    tasks = bench.synthetic_tasks(args.meta_batch, cpu, bench.IMAGE_SHAPE)
    model, backward = bench.build(
        bench.Family("MAML", False, args.steps), "metarun", args.meta_batch, cpu
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=bench.META_LR)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        backward(tasks)
        optimizer.step()

    for _ in range(2):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        train_step()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        train_step()
        wall_us = (time.perf_counter() - start) * 1e6
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15))
    print(
        f"\nMAML 2nd order, {args.steps} inner step(s), meta-batch {args.meta_batch}, "
        f"{torch.get_num_threads()} thread(s): step {wall_us / 1e6:.2f} s under the profiler "
        f"({args.meta_batch / (wall_us / 1e6):.1f} tasks/s); last warm-up step: {faults} minor page faults "
        f"({faults * resource.getpagesize() / 2**20:.0f} MiB){', glibc defaults' if args.glibc_default else ''}\n"
    )
    print(markdown(list(averages), wall_us, args.meta_batch, args.rows))


if __name__ == "__main__":
    main()
