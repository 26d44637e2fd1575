"""A run stopped by SIGTERM or a launcher's pre-timeout signal saves last.pt at a step boundary and
resumes to the numbers of a run that was never stopped."""

from __future__ import annotations

import io
import json
import signal

import pytest

import metarun.checkpoint
from metarun.checkpoint import load_checkpoint
from metarun.preemption import Stopped, StopRequests
from metarun.trainer import Trainer
from tests.test_trainer import small_run


def signal_after_step(trainer: Trainer, step: int, signum: int) -> None:
    """Raise `signum` in the middle of training, once `step` steps are done."""
    train_step = trainer.train_step

    def step_then_signal(tasks, **kwargs):
        metrics = train_step(tasks, **kwargs)
        if trainer.step + 1 == step:  # trainer.step counts this step once train_step returns
            signal.raise_signal(signum)
        return metrics

    trainer.train_step = step_then_signal


def drop_timing(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("config", "wall_time_s")}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_signalled_run_saves_its_step_and_resumes_to_the_uninterrupted_results(
    make_config, tmp_path, signum
):
    config = small_run(make_config, "train.steps=20", "train.val_every=10")
    straight = Trainer(config, tmp_path / "straight").run()
    trainer = Trainer(config, tmp_path / "stopped")
    signal_after_step(trainer, 7, signum)
    with pytest.raises(Stopped) as stopped:
        trainer.run()
    assert (stopped.value.signum, stopped.value.step) == (signum, 7)
    assert load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")["step"] == 7
    assert not (tmp_path / "stopped" / "results.json").exists()
    assert signal.getsignal(signum) is signal.SIG_DFL  # our handler is gone again

    resumed = Trainer(config, tmp_path / "stopped").run()
    assert drop_timing(resumed) == drop_timing(straight)
    logs = [
        [
            {k: v for k, v in json.loads(line).items() if k != "tasks_per_s"}
            for line in (tmp_path / name / "metrics.jsonl").open()
        ]
        for name in ("straight", "stopped")
    ]
    assert logs[0] == logs[1]


def test_the_previous_handler_gets_the_signal_after_last_pt_is_written(make_config, tmp_path):
    """Under submitit the previous handler requeues the job: it must see the checkpoint already saved."""
    seen = []
    last = tmp_path / "checkpoints" / "last.pt"
    previous = signal.signal(
        signal.SIGUSR2, lambda signum, frame: seen.append(load_checkpoint(last)["step"])
    )
    try:
        trainer = Trainer(small_run(make_config, "train.steps=20", "train.val_every=10"), tmp_path)
        signal_after_step(trainer, 3, signal.SIGUSR2)
        with pytest.raises(Stopped):
            trainer.run()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [3]


def test_signal_during_a_checkpoint_write_leaves_a_complete_checkpoint(
    make_config, tmp_path, monkeypatch
):
    """The handler only takes note: the write in progress finishes, and the run stops after it."""
    save = metarun.checkpoint.torch.save

    def save_with_a_signal_halfway(obj, f):
        buffer = io.BytesIO()
        save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        signal.raise_signal(signal.SIGTERM)
        f.write(data[len(data) // 2 :])

    trainer = Trainer(small_run(make_config, "train.steps=20", "train.val_every=10"), tmp_path)
    monkeypatch.setattr(metarun.checkpoint.torch, "save", save_with_a_signal_halfway)
    with pytest.raises(Stopped) as stopped:
        trainer.run()
    monkeypatch.undo()
    assert stopped.value.step == 10  # the validation step whose checkpoint write was signalled
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 10
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] == 10


def test_stop_requests_restore_the_handlers_they_replaced():
    mine = lambda signum, frame: None
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with StopRequests() as stop:
            signal.raise_signal(signal.SIGTERM)
            assert stop.requested == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
