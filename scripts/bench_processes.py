"""One process against two (torchrun, gloo, CPU): the real `metarun` command, same config, same data.

    python scripts/bench_processes.py [--rounds 3] [--steps 30]

Each round runs `python -m metarun` and `torchrun --nproc_per_node=2 -m metarun` once each, in
rotating order, on real Omniglot ($METARUN_DATA) and reads the tasks/s the trainer logged
(metrics.jsonl, the median over logged steps after the first). Printed: tasks/s in total and
per process, each the median over rounds with the min-max, and the ratio of two processes to
one, taken within rounds. torchrun gives each process one thread (OMP_NUM_THREADS=1); the
single process keeps PyTorch's default (all cores), so on a machine of C cores this compares
C threads in one process with 2 processes of one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from rounds import Spread, rotated  # noqa: E402

FAMILIES = {
    "protonet 5w1s, meta-batch 32": ("algorithm=protonet", "episode.meta_batch_size=32"),
    "MAML 2nd order 5w1s, 1 step, meta-batch 32": (
        "algorithm=maml",
        "algorithm.first_order=false",
        "algorithm.adaptation_steps=1",
        "episode.meta_batch_size=32",
    ),
}
COMMANDS = {
    "1 process": [sys.executable, "-m", "metarun"],
    "2 processes": [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "metarun",
    ],
}


def tasks_per_s(command: list[str], overrides: tuple[str, ...], steps: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        done = subprocess.run(
            [
                *command,
                *overrides,
                "device=cpu",
                f"train.steps={steps}",
                f"train.val_every={steps}",
                "train.log_every=5",
                "train.val_episodes=5",
                "eval.episodes=5",
                f"hydra.run.dir={run_dir}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            sys.exit(
                f"bench_processes: {' '.join(command[-3:])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
            )
        lines = [
            json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        ]
        rates = [line["tasks_per_s"] for line in lines if line["split"] == "train"][1:]
        return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("METARUN_DATA", str(REPO.parent / "shared" / "data"))
    print(
        "| family | variant | tasks/s total (min-max) | per process | vs 1 process (min-max) |\n|---|---|---:|---:|---:|"
    )
    for family, overrides in FAMILIES.items():
        rates: dict[str, list[float]] = {name: [] for name in COMMANDS}
        for r in range(args.rounds):
            for name in rotated(list(COMMANDS), r):
                rates[name].append(tasks_per_s(COMMANDS[name], overrides, args.steps))
        for name, values in rates.items():
            total = Spread.of(values)
            ratio = Spread.of([two / one for two, one in zip(values, rates["1 process"])])
            processes = 2 if name == "2 processes" else 1
            print(
                f"| {family} | {name} | {total.median:.1f} ({total.low:.1f}-{total.high:.1f}) | "
                f"{total.median / processes:.1f} | {ratio.median:.2f}x ({ratio.low:.2f}-{ratio.high:.2f}) |"
            )


if __name__ == "__main__":
    main()
