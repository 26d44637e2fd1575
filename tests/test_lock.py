"""One process trains a run directory: a second start on a live run refuses in one line and writes
nothing; a run killed with kill -9 leaves its directory free, and the next start resumes it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from metarun.checkpoint import load_checkpoint
from metarun.lock import RunDirBusy, check_run_dir_free, lock_run_dir
from metarun.run_dir import LOCK as RUN_LOCK
from tests.commands.test_train import metarun_in_process, snapshot
from tests.conftest import REPO

# A ProtoNet run small enough that its steps take milliseconds.
TINY = (
    "device=cpu",
    "model.hidden=8",
    "episode.meta_batch_size=1",
    "episode.n_query=1",
    "train.val_episodes=4",
    "train.log_every=5",
    "eval.episodes=4",
    "eval.batch_size=4",
)


def arguments(run_dir, omniglot_root, omniglot_cache, *overrides: str) -> list[str]:
    return [
        f"hydra.run.dir={run_dir}",
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
        *TINY,
        *overrides,
    ]


def start(run_dir, *args: str) -> subprocess.Popen:
    """`metarun ARGS` in its own process, its output in files beside the run directory."""
    out = (run_dir.parent / f"{run_dir.name}.out").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "metarun.commands.train", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=run_dir.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )


def wait_for(path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, (
            f"the run ended ({process.returncode}) before writing {path.name}"
        )
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


def test_a_second_start_on_a_live_run_refuses_naming_it_and_writes_nothing(
    tmp_path, omniglot_root, omniglot_cache
):
    run_dir = tmp_path / "run"
    args = arguments(run_dir, omniglot_root, omniglot_cache, "train.steps=20", "train.val_every=10")
    first = start(run_dir, *args)
    try:
        wait_for(run_dir / ".hydra" / "config.yaml", first)  # it is training
        os.kill(
            first.pid, signal.SIGSTOP
        )  # alive, holding the directory, writing nothing while we look
        before = snapshot(run_dir)
        second = subprocess.run(
            [sys.executable, "-m", "metarun.commands.train", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert snapshot(run_dir) == before
        os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith("metarun: error: ") and second.stderr.count("\n") == 1, (
            second.stderr
        )
        assert (
            f"{run_dir} is being trained by process {first.pid} on {socket.gethostname()}"
            in second.stderr
        )
        assert first.wait(timeout=300) == 0, (tmp_path / "run.out").read_text()
    finally:
        first.kill()
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 20
    assert not (run_dir / RUN_LOCK).exists()  # the run that ended let go of its directory


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(
    tmp_path, omniglot_root, omniglot_cache, monkeypatch
):
    run_dir = tmp_path / "run"
    killed = start(
        run_dir,
        *arguments(
            run_dir, omniglot_root, omniglot_cache, "train.steps=10000", "train.val_every=5"
        ),
    )
    try:
        wait_for(run_dir / "checkpoints" / "last.pt", killed)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert (
        run_dir / RUN_LOCK
    ).exists()  # a killed run cannot tidy up: its lock file stays, unlocked
    step = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    logged = [
        line
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["step"] <= step
    ]

    steps = step + 5  # a resumed run may change train.steps
    code = metarun_in_process(
        monkeypatch,
        *arguments(
            run_dir, omniglot_root, omniglot_cache, f"train.steps={steps}", "train.val_every=5"
        ),
    )
    assert code == 0
    assert json.loads((run_dir / "results.json").read_text())["steps"] == steps
    # Resumed, not started over: the killed run's lines (their tasks/s are its own timings) are still there.
    assert (run_dir / "metrics.jsonl").read_text().splitlines()[: len(logged)] == logged
    assert not (run_dir / RUN_LOCK).exists()


HOLD = """
import sys, time
from pathlib import Path
from metarun.lock import lock_run_dir
lock_run_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_the_lock_names_its_live_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        for take in (check_run_dir_free, lock_run_dir):
            with pytest.raises(RunDirBusy) as busy:
                take(tmp_path)
            message = str(busy.value)
            assert (
                f"process {holder.pid} on {socket.gethostname()} (started " in message
                and "\n" not in message
            )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    check_run_dir_free(tmp_path)
    lock = lock_run_dir(tmp_path)
    assert json.loads((tmp_path / RUN_LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert list(tmp_path.iterdir()) == []
