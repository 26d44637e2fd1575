"""A damaged or unfinished run directory read back by metarun-eval, metarun-predict and metarun.load:
one line that says what is wrong and what to do, exit code 2 (a MetarunError in Python), never a
traceback, and nothing written. Each directory is really damaged: a copy of a trained run with a
file cut short or a folder gone, a run that a live process still trains, one stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import metarun
from metarun.commands.eval import main as eval_main
from metarun.commands.predict import main as predict_main
from tests.conftest import DATA_ROOT, REPO, one_line_error
from tests.trained_runs import trained_run


@pytest.fixture(scope="module")
def protonet_run(tmp_path_factory, omniglot_root, omniglot_cache):
    return trained_run("protonet", tmp_path_factory, omniglot_root, omniglot_cache)[0]


@pytest.fixture(scope="module")
def drawings(tmp_path_factory, omniglot_root) -> Path:
    """support/<character>/ with one drawing each of 2 characters, and query/ with one more."""
    root = tmp_path_factory.mktemp("drawings")
    alphabet = omniglot_root / "omniglot-py" / "images_evaluation" / "Atlantean"
    for character in ("character01", "character02"):
        files = sorted((alphabet / character).glob("*.png"))
        (root / "support" / character).mkdir(parents=True)
        shutil.copy(files[0], root / "support" / character / files[0].name)
        (root / "query").mkdir(exist_ok=True)
        shutil.copy(files[1], root / "query" / files[1].name)
    return root


def cut_short(path: Path, at_line_end: bool = False) -> None:
    """Truncate the file to half its bytes (or to the end of the line there), as a full disk or an
    interrupted copy leaves it."""
    size = path.stat().st_size // 2
    if at_line_end:
        size = path.read_bytes()[:size].rindex(b"\n") + 1
    os.truncate(path, size)


DAMAGES = {
    "no .hydra": (
        lambda d: shutil.rmtree(d / ".hydra"),
        r"holds a run's files but no \.hydra/config\.yaml \(the config it trained with\); copy the run's "
        r"\.hydra/ folder back",
    ),
    "config cut short": (
        lambda d: cut_short(d / ".hydra" / "config.yaml"),
        r"config\.yaml is cut short or damaged \(.+\); copy \.hydra/config\.yaml back",
    ),
    # Valid YAML, but the keys after the cut are gone: the schema must not fill them with defaults.
    "config cut after a line": (
        lambda d: cut_short(d / ".hydra" / "config.yaml", at_line_end=True),
        r"config\.yaml is cut short or damaged \(no [a-z, ]*seed\); copy \.hydra/config\.yaml back",
    ),
    "results.json cut short": (
        lambda d: cut_short(d / "results.json"),
        r"results\.json is cut short or damaged \(.+\); give CHECKPOINT(best) to test its "
        r"best checkpoint anyway",
    ),
    "best.pt cut short": (
        lambda d: cut_short(d / "checkpoints" / "best.pt"),
        r"cannot read checkpoint .+best\.pt .+; train it again or give CHECKPOINT(last)$",
    ),
}
# How each entry point names the checkpoint option in its fix.
OPTIONS = {
    "metarun-eval": "checkpoint={}",
    "metarun-predict": "--checkpoint {}",
    "metarun.load": 'checkpoint="{}"',
}


def damaged(run_dir: Path, tmp_path: Path, damage: str) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("eval"))
    DAMAGES[damage][0](copy)
    return copy


def files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def error_of(
    entry: str, run_dir: Path, drawings: Path, tmp_path: Path, capsys, *arguments: str
) -> str:
    """The one error line `entry` gives for `run_dir`, checked: exit code 2, prefix, one line."""
    if entry == "metarun.load":
        return one_line_error(lambda: metarun.load(run_dir, device="cpu"))
    with pytest.raises(SystemExit) as exit:
        if entry == "metarun-eval":
            eval_main([str(run_dir), *arguments])
        else:
            predict_main(
                [
                    str(run_dir),
                    "--support",
                    str(drawings / "support"),
                    "--query",
                    str(drawings / "query"),
                    "--out",
                    str(tmp_path / "predictions.csv"),
                    "--device",
                    "cpu",
                    *arguments,
                ]
            )
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(f"{entry}: error: ") and err.count("\n") == 1, (
        err
    )
    assert "Traceback" not in err and ";" in err
    return err.removeprefix(f"{entry}: error: ").rstrip("\n")


@pytest.mark.parametrize("entry", list(OPTIONS))
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_run_directory_is_one_line_naming_the_fix(
    protonet_run, drawings, tmp_path, capsys, damage, entry
):
    run_dir = damaged(protonet_run, tmp_path, damage)
    before = files(run_dir)
    message = error_of(entry, run_dir, drawings, tmp_path, capsys)
    expected = re.sub(
        r"CHECKPOINT\((\w+)\)", lambda m: re.escape(OPTIONS[entry].format(m[1])), DAMAGES[damage][1]
    )
    assert re.search(expected, message), message
    assert files(run_dir) == before and not (tmp_path / "predictions.csv").exists()


def test_a_damaged_results_json_still_tests_when_a_checkpoint_is_named(protonet_run, tmp_path):
    run_dir = damaged(protonet_run, tmp_path, "results.json cut short")
    eval_main([str(run_dir), "checkpoint=best", "eval.episodes=5"])
    assert (
        json.loads((run_dir / "eval" / "episodes=5" / "results.json").read_text())["episodes"] == 5
    )
    assert len(metarun.load(run_dir, "best", device="cpu").learner.state_dict()) > 0


def start_training(run_dir: Path, omniglot_root: Path, omniglot_cache: Path) -> subprocess.Popen:
    """`metarun` in a second process, training run_dir for far longer than the test waits, its first
    validation (and so best.pt) out of reach."""
    command = [
        sys.executable,
        "-m",
        "metarun",
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
        "device=cpu",
        "algorithm=protonet",
        "model.hidden=16",
        "episode.meta_batch_size=1",
        "train.steps=1000000",
        "train.val_every=1000000",
        "train.log_every=1",
        f"hydra.run.dir={run_dir}",
    ]
    env = {
        **os.environ,
        "METARUN_DATA": str(DATA_ROOT),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    log = (run_dir.parent / "training.log").open("w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training exited with {process.returncode}"
        assert time.monotonic() < deadline, "training did not get that far in time"
        time.sleep(0.2)


def test_a_run_still_training_then_stopped_before_its_test_is_one_line(
    omniglot_root, omniglot_cache, drawings, tmp_path, capsys
):
    run_dir = tmp_path / "training"
    process = start_training(run_dir, omniglot_root, omniglot_cache)
    try:
        wait_for(
            lambda: (
                (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text()
            ),
            process,
        )
        for entry in OPTIONS:
            message = error_of(entry, run_dir, drawings, tmp_path, capsys)
            assert re.search(
                rf"is still training \(process {process.pid} on .+\); wait for it to finish \(it writes "
                r"results\.json after its test\)",
                message,
            ), message
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]
    assert not (run_dir / "results.json").exists()
    before = files(run_dir)
    for entry, option in OPTIONS.items():
        message = error_of(entry, run_dir, drawings, tmp_path, capsys)
        assert message.startswith(
            f"{run_dir} has not finished: it stopped before its test (no results.json) with "
            "only checkpoints/last.pt; resume it to the end (metarun ... hydra.run.dir="
        ), message
        assert message.endswith(
            f"or give {option.format('last')} to test the checkpoint it has now"
        ), message
    assert files(run_dir) == before
    eval_main(
        [str(run_dir), "checkpoint=last", "eval.episodes=5"]
    )  # named, the checkpoint it has is tested
    assert (run_dir / "eval" / "episodes=5,checkpoint=last" / "results.json").is_file()
