"""Faults a run meets after it started: numbers that diverge, a disk that refuses a write, places
that cannot be written. Each is one line naming what happened and what to do, a non-zero exit, and
nothing lost: the last good checkpoint loads, no temporary file is left.

A full disk is played by RLIMIT_FSIZE in a child process: a write past the limit fails with EFBIG
(SIGXFSZ ignored), through the same system calls that fail with ENOSPC on a full disk.
"""

from __future__ import annotations

import json
import math
import re
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from metarun.checkpoint import load_checkpoint
from metarun.errors import MetarunError
from metarun.trainer import Trainer
from tests.commands.test_train import metarun_in_process
from tests.conftest import compose_config, one_line_error

TINY = (
    "algorithm=protonet",
    "model.hidden=16",
    "episode.meta_batch_size=2",
    "episode.n_query=2",
    "train.val_episodes=4",
    "eval.episodes=4",
    "eval.batch_size=4",
    "device=cpu",
)


def file_size_limit(limit: int):
    """A child's preexec_fn: writes past `limit` bytes fail with EFBIG, as writes on a full disk fail."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def metarun(*args: str, cwd: Path, limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metarun.commands.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        preexec_fn=file_size_limit(limit) if limit else None,
    )


def python(code: str, cwd: Path, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        preexec_fn=file_size_limit(limit),
    )


def data(omniglot_root: Path, omniglot_cache: Path) -> tuple[str, ...]:
    return (
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
    )


def finite(path: Path) -> bool:
    return all(
        torch.isfinite(t).all()
        for t in load_checkpoint(path)["learner"].values()
        if t.is_floating_point()
    )


def temporary_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob(".*.tmp"))


# -- diverging numbers ------------------------------------------------------------------------------
def test_a_diverging_run_exits_1_naming_the_step_and_the_fix_and_keeps_finite_checkpoints(
    tmp_path, omniglot_root, omniglot_cache, monkeypatch, capsys
):
    # Plain SGD at lr 0.01 for 3 steps (validated and checkpointed at step 3), then the schedule
    # multiplies the learning rate by 1e30: step 4's update overflows the weights, step 5's loss is NaN.
    run_dir = tmp_path / "run"
    code = metarun_in_process(
        monkeypatch,
        f"hydra.run.dir={run_dir}",
        *data(omniglot_root, omniglot_cache),
        *TINY,
        "optimizer=sgd",
        "optimizer.momentum=0.0",
        "scheduler=step",
        "scheduler.step_size=3",
        "scheduler.gamma=1e30",
        "train.steps=8",
        "train.val_every=3",
        "train.log_every=4",
    )
    stderr = capsys.readouterr().err
    assert code == 1, stderr
    assert stderr.count("\n") == 1 and re.match(
        r"metarun: error: step 5: loss (nan|inf|-inf), ", stderr
    ), stderr
    for fix in (
        "lower optimizer.lr (now 0.01, 1e+28 at this step)",
        "train.grad_clip",
        "checkpoints/last.pt keeps step 3",
    ):
        assert fix in stderr
    last, best = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    assert load_checkpoint(last)["step"] == 3 and finite(last)
    assert load_checkpoint(best)["step"] == 3 and finite(best)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(line["step"] for line in logged) == 4  # step 5 was never logged...
    assert all(math.isfinite(v) for line in logged for v in line.values() if isinstance(v, float))
    assert not (run_dir / "results.json").exists()  # ...nor tested
    assert (
        json.loads((run_dir / "failed.json").read_text())["error"]
        == stderr.removeprefix("metarun: error: ").strip()
    )


def test_a_nan_validation_score_is_never_best_and_never_saved(make_config, tmp_path):
    trainer = Trainer(make_config(*TINY, "train.steps=2", "train.val_every=2"), tmp_path)
    trainer.run()
    before = {
        name: (tmp_path / "checkpoints" / name).read_bytes() for name in ("last.pt", "best.pt")
    }
    best_val = trainer.best_val
    with torch.no_grad():  # weights that score NaN on every validation episode
        for p in trainer.learner.parameters():
            p.fill_(float("nan"))
    message = one_line_error(trainer.validate_and_checkpoint)
    # NaN logits: the loss is NaN, the accuracy whatever argmax makes of them.
    assert (
        message.startswith("step 2: validation accuracy ")
        and ", loss nan; the run diverged" in message
    )
    assert "checkpoints/last.pt keeps step 2" in message
    assert trainer.best_val == best_val
    assert {name: (tmp_path / "checkpoints" / name).read_bytes() for name in before} == before


def test_fp16_skipped_steps_stop_the_run_only_when_they_persist():
    from metarun.divergence import NonFiniteSteps

    def steps(watch, first: int, losses: list[float]):
        for step, loss in enumerate(losses, first):
            watch.observe(step, torch.tensor(loss), torch.tensor(1.0))
        return watch.check()

    nan = float("nan")
    watch = NonFiniteSteps(patience=3)
    # Two skipped steps, a good one, two more: the scaler finding its scale, not divergence.
    assert steps(watch, 1, [1.0, nan, nan, 0.9, nan, nan, 0.8]) is None
    # A run of three spread over two checks stops it, named by the step that opened the run.
    assert steps(watch, 8, [nan, nan]) is None
    found = steps(watch, 10, [float("inf"), 0.7])
    assert found is not None and found[0] == 8 and math.isnan(found[1]) and found[3] == 3
    assert NonFiniteSteps(patience=1).check() is None
    once = NonFiniteSteps(patience=1)
    assert steps(once, 1, [1.0, float("inf")])[:2] == (2, float("inf"))


# -- the disk -------------------------------------------------------------------------------------
def test_a_full_disk_while_checkpointing_ends_in_one_line_and_keeps_the_last_checkpoint(
    tmp_path, omniglot_root, omniglot_cache
):
    run_dir = tmp_path / "run"
    args = (*data(omniglot_root, omniglot_cache), *TINY, "train.val_every=2", "train.log_every=1")
    Trainer(
        compose_config(*args, "train.steps=2"), run_dir
    ).run()  # last.pt (113 kB) and best.pt (34 kB) at step 2
    # best.pt fits under 60 kB, last.pt does not: step 4's last.pt fails, step 2's stays.
    failed = metarun(f"hydra.run.dir={run_dir}", *args, "train.steps=4", cwd=tmp_path, limit=60_000)
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1, failed.stderr
    assert failed.stderr.startswith(
        f"metarun: error: cannot write {run_dir}/checkpoints/last.pt: File too large ("
    )
    fix = " free there); free space there, then the same command resumes from checkpoints/last.pt (step 2)"
    assert fix in failed.stderr
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 2
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["step"] in (2, 4)
    assert temporary_files(run_dir) == []


def test_a_full_disk_while_writing_a_file_keeps_the_old_one_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("the old results\n")
    result = python(
        f"""
        from pathlib import Path
        from metarun.atomic import write_atomically
        write_atomically(Path({str(target)!r}), lambda f: f.write(b"x" * 20_000))
    """,
        tmp_path,
        limit=10_000,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"metarun.atomic.WriteFailed: cannot write {target}: File too large (")
    assert " free there); " in last
    assert target.read_text() == "the old results\n"
    assert temporary_files(tmp_path) == []


@pytest.mark.parametrize("where", ["metrics.jsonl", "tb"])
def test_a_full_disk_while_logging_is_one_line_naming_the_file(tmp_path, where):
    # metrics.jsonl near the limit fails the next line; else TensorBoard's events file (written by
    # its background thread) is the one that grows past it.
    line = '{"step": 1, "split": "train", "loss": 1.0}\n'  # 44 bytes
    (tmp_path / "metrics.jsonl").write_text(line * (190 if where == "metrics.jsonl" else 1))
    result = python(
        f"""
        import sys
        from pathlib import Path
        from metarun.errors import MetarunError
        from metarun.run_log import RunLog
        log = RunLog(Path({str(tmp_path)!r}), resume_step=1)
        try:
            for step in range(2, 2000):
                log.scalars("train", step, {{"loss": 1.0, "accuracy": 0.5, "lr": 0.001}})
            log.close()
        except MetarunError as e:
            sys.exit(f"error: {{e}}")
    """,
        tmp_path,
        limit=8_500,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr  # no traceback from TensorBoard's thread
    assert result.stderr.startswith(f"error: cannot write {tmp_path / where}: File too large (")


def test_resume_rewrites_metrics_jsonl_atomically(tmp_path):
    # The rewrite that drops lines after the checkpoint fails part way: the lines before it stay.
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(
            json.dumps({"step": s, "split": "train", "loss": 1.0}) + "\n" for s in range(1, 301)
        )
    )
    before = metrics.read_bytes()
    result = python(
        f"""
        from pathlib import Path
        from metarun.run_log import RunLog
        RunLog(Path({str(tmp_path)!r}), resume_step=299)
    """,
        tmp_path,
        limit=5_000,
    )
    assert result.returncode != 0
    assert f"cannot write {metrics}: File too large" in result.stderr.strip().splitlines()[-1]
    assert metrics.read_bytes() == before
    assert temporary_files(tmp_path) == []


# -- places that cannot be written ----------------------------------------------------------------
def test_a_run_directory_under_a_file_is_one_line_and_exit_2(
    tmp_path, omniglot_root, omniglot_cache, monkeypatch, capsys
):
    (tmp_path / "file.txt").write_text("")
    code = metarun_in_process(
        monkeypatch,
        f"hydra.run.dir={tmp_path}/file.txt/run",
        *data(omniglot_root, omniglot_cache),
        *TINY,
    )
    assert code == 2
    assert capsys.readouterr().err == (
        f"metarun: error: cannot make {tmp_path}/file.txt/run (Not a directory); "
        "choose another hydra.run.dir (hydra.sweep.dir for a sweep)\n"
    )


def test_a_run_directory_that_cannot_be_written_is_one_line_before_training(make_config):
    # sysfs: a folder that exists and that even root cannot create files in.
    message = one_line_error(lambda: Trainer(make_config(*TINY), Path("/sys/kernel")))
    assert message.startswith("cannot write in /sys/kernel (") and message.endswith(
        "; choose another hydra.run.dir"
    )


def test_a_cache_folder_that_cannot_be_written_is_one_line_before_decoding(make_config, tmp_path):
    (tmp_path / "file.txt").write_text("")
    cache = tmp_path / "file.txt" / "cache"
    message = one_line_error(
        lambda: Trainer(make_config(*TINY, f"dataset.cache_dir={cache}"), tmp_path / "run")
    )
    assert message == (
        f"cannot write in {cache} ({tmp_path}/file.txt is a file, not a folder); "
        "set dataset.cache_dir (or METARUN_CACHE) to a folder you can write"
    )
    assert not (tmp_path / "run").exists()


def test_a_failed_write_is_a_run_failure_with_exit_code_1():
    from metarun.atomic import WriteFailed
    from metarun.divergence import Diverged

    assert MetarunError("bad command; fix it").exit_code == 2
    assert (
        WriteFailed("x", OSError(28, "No space left on device")).exit_code
        == Diverged("x").exit_code
        == 1
    )
