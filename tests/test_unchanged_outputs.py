"""A short run's files, number for number, as the code before the redesign (one owner per fact about a run) wrote them.

`tests/fixtures/unchanged/<run>/` holds results.json, test_episodes.json and metrics.jsonl of each
command in RUNS (and of a metarun-eval of the first), written by that code and stripped as below (rewritten 2026-12 with the kernels pinned to AVX2,
SAME_KERNELS, by the code of then, which on an AVX2 CPU wrote the same numbers as the code before); each test runs the same
command through the console scripts and compares. What depends on the machine is left out: wall
times, tasks per second, where the data lies. Losses agree to 1e-3 relative and accuracies to one
query (another CPU's kernels round differently, see `close`); everything else exactly. `python -m tests.test_unchanged_outputs` rewrites the
fixtures, for a change that is meant to change the numbers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA_ROOT, REPO

FIXTURES = REPO / "tests" / "fixtures" / "unchanged"
SHORT = (
    "device=cpu",
    "train.steps=6",
    "train.val_every=3",
    "train.log_every=2",
    "train.val_episodes=10",
    "eval.episodes=12",
)
# One task after another (algorithm.task_workers=1), as that code ran them: worker threads compute
# each task on one intra-op thread, whose float32 sums differ in the last bits (tests/test_task_workers.py
# holds them to the one-worker path).
RUNS = {
    "protonet": (
        "algorithm=protonet",
        "algorithm.task_workers=1",
        "episode.n_query=5",
        "dataset.download=false",
    ),
    "maml_sinusoid": ("+experiment=maml_sinusoid", "algorithm.task_workers=1"),
}
EVAL = ("eval.n_way=10",)  # metarun-eval of the protonet run
FILES = ("results.json", "test_episodes.json", "metrics.jsonl")
MACHINE = (
    "wall_time_s",
    "tasks_per_s",
    "root",
    "cache_dir",
    "task_workers",  # a key added since, set to 1 above
)  # keys whose values depend on the machine


# The kernels every x86-64 CPU with AVX2 runs alike (oneDNN's, ATen's and MKL's): with AVX-512
# they sum in other orders, and six Adam steps carry that 1e-7 to 1% in the losses.
SAME_KERNELS = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def scripts() -> Path:
    return Path(sys.executable).parent


def train(name: str, run_dir: Path, cache: Path) -> None:
    extra = (
        (f"dataset.root={DATA_ROOT / 'omniglot'}", f"dataset.cache_dir={cache}")
        if name == "protonet"
        else ()
    )
    subprocess.run(
        [scripts() / "metarun", *RUNS[name], *SHORT, *extra, f"hydra.run.dir={run_dir}"],
        check=True,
        capture_output=True,
        env={**os.environ, **SAME_KERNELS, "PYTHONHASHSEED": "0"},
    )


def evaluate(run_dir: Path) -> Path:
    subprocess.run(
        [scripts() / "metarun-eval", run_dir, *EVAL, "name=unchanged"],
        check=True,
        capture_output=True,
        env={**os.environ, **SAME_KERNELS},
    )
    return run_dir / "eval" / "unchanged"


def read(folder: Path) -> dict[str, Any]:
    """The folder's files as data, the machine-dependent values left out."""
    out = {}
    for name in FILES:
        path = folder / name
        if path.exists():
            text = path.read_text()
            records = (
                [json.loads(line) for line in text.splitlines()]
                if name.endswith(".jsonl")
                else json.loads(text)
            )
            out[name] = strip(records)
    return out


def strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in MACHINE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        if old.keys() != new.keys():
            return [f"{where}: keys {sorted(old.keys() ^ new.keys())} differ"]
        return [d for k in old for d in differences(old[k], new[k], f"{where}.{k}")]
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [f"{where}: {len(old)} entries, now {len(new)}"]
        return [
            d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{where}[{i}]")
        ]
    if isinstance(old, float) and isinstance(new, float):
        return [] if close(old, new, where) else [f"{where}: {old} -> {new}"]
    return [] if old == new and type(old) is type(new) else [f"{where}: {old!r} -> {new!r}"]


# Another CPU's kernels round differently (1e-7 in the first loss), which can flip a query whose
# two best classes nearly tie: an accuracy may move by one query of an episode (N*Q = 25 here) and
# what follows from it (the CI, a checkpoint chosen) by as much; losses agree to 1e-3.
ONE_QUERY = 1 / 25


def close(old: float, new: float, where: str) -> bool:
    if "accuracy" in where or "values" in where:
        return abs(old - new) <= ONE_QUERY + 1e-6
    if where.endswith("ci95"):
        return math.isclose(old, new, rel_tol=0.05)
    return math.isclose(old, new, rel_tol=1e-3, abs_tol=1e-7)


@pytest.fixture(scope="module")
def written(tmp_path_factory, omniglot_root, omniglot_cache) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("unchanged")
    folders = {}
    for name in RUNS:
        train(name, base / name, omniglot_cache)
        folders[name] = base / name
    folders["protonet_eval"] = evaluate(base / "protonet")
    return folders


@pytest.mark.parametrize("run", [*RUNS, "protonet_eval"])
def test_a_short_run_writes_what_it_wrote_before_the_redesign(written, run):
    expected = read(FIXTURES / run)
    assert set(expected) >= {"results.json", "test_episodes.json"}
    found = differences(expected, read(written[run]))
    assert not found, f"{run}: " + "; ".join(found[:5])


if __name__ == "__main__":  # rewrite the fixtures from what the code writes now
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        cache = Path(os.environ.get("METARUN_CACHE") or base / "cache")
        for name in RUNS:
            train(name, base / name, cache)
        folders = {name: base / name for name in RUNS} | {
            "protonet_eval": evaluate(base / "protonet")
        }
        for name, folder in folders.items():
            shutil.rmtree(FIXTURES / name, ignore_errors=True)
            (FIXTURES / name).mkdir(parents=True)
            for file, records in read(folder).items():  # stripped: no machine's paths or timings
                lines = (
                    [json.dumps(r) for r in records]
                    if file.endswith(".jsonl")
                    else [json.dumps(records, indent=2)]
                )
                (FIXTURES / name / file).write_text("\n".join(lines) + "\n")
            print(f"wrote {FIXTURES / name}")
