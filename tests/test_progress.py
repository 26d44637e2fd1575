"""Without a terminal (a batch job's log), training progress is a plain line every log_every steps."""

from __future__ import annotations

import re

from metarun.progress import Progress
from metarun.trainer import Trainer
from tests.test_trainer import small_run


def test_a_run_without_a_terminal_prints_a_progress_line_every_log_every_steps(
    make_config, tmp_path, capsys
):
    Trainer(small_run(make_config, "train.steps=20", "train.log_every=5"), tmp_path).run()
    lines = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("step ") and "/20" in line
    ]
    assert [line.split()[1] for line in lines] == ["5/20", "10/20", "15/20", "20/20"]
    pattern = (
        r"step 10/20  loss [\d.]+  acc [\d.]+  tasks/s [\d.]+  elapsed \d\d:\d\d  eta \d\d:\d\d"
    )
    assert re.fullmatch(pattern, lines[1]), lines[1]


def test_progress_lines_also_come_every_so_many_seconds(capsys):
    progress = Progress(total=100, initial=40, every=1000, seconds=0.0)
    progress.update(41, {"loss": 0.5})
    progress.update(42)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[:2] for line in lines] == [
        ["step 41/100", "loss 0.5"],
        ["step 42/100", "loss 0.5"],
    ]
    assert lines[0].endswith(tuple(f"eta 00:0{s}" for s in range(10)))


def test_a_disabled_progress_prints_nothing(capsys):
    """Ranks other than 0 of a several-process run."""
    progress = Progress(total=10, initial=0, every=1, enabled=False)
    progress.update(1, {"loss": 1.0})
    progress.write("step 1: val ...")
    progress.close()
    assert capsys.readouterr().out == ""
