"""The tasks of a meta-batch on worker threads (`algorithm.task_workers`): the same meta-gradient,
running statistics and test scores as one task after another, and bit-identical runs."""

from __future__ import annotations

import contextlib
import json
import threading

import pytest
import torch
from torch import nn

from metarun.evaluation import evaluate_batch
from metarun.task_workers import (
    evaluation_pays,
    in_order,
    resolve_task_workers,
    threads_for,
    training_pays,
)
from metarun.trainer import Trainer
from tests.conftest import one_line_error
from tests.test_task_chunks import CHUNKED, CLIP, steps_by_chunk

MAMLPP = ("algorithm.msl_steps=100", "algorithm.lslr=true", "algorithm.per_step_bn=true")
# (algorithm, overrides, fp16 loss scale, meta-batch): every learner that splits its meta-batch
# with an fp16 scaler's loss scale; second-order MAML also at 4 and 8 tasks, in chunks of 2, with
# running batch-norm statistics, and as MAML++ with every option on.
CASES = [(algorithm, (), 2.0**12, 3) for algorithm in CHUNKED] + [
    ("maml", (), 1.0, 4),
    ("maml", ("algorithm.task_chunk=2",), 1.0, 8),
    ("maml", ("model.batch_norm=running",), 2.0**12, 4),
    ("maml", MAMLPP, 1.0, 4),
    ("protonet", ("model.batch_norm=running",), 1.0, 4),
]


@pytest.mark.parametrize(
    "algorithm, overrides, loss_scale, meta_batch",
    CASES,
    ids=[
        f"{c[0]}-{'-'.join(o.split('=')[0].split('.')[-1] for o in c[1]) or 'plain'}-{c[3]}"
        for c in CASES
    ],
)
def test_two_workers_give_the_one_worker_meta_gradient_in_float64(
    make_config, tmp_path, float64_tasks, algorithm, overrides, loss_scale, meta_batch
):
    steps = steps_by_chunk(
        make_config,
        tmp_path,
        algorithm,
        float64_tasks[meta_batch],
        loss_scale,
        (1, 2),
        setting="task_workers",
        overrides=overrides,
    )
    one, two = steps[1], steps[2]
    assert one[2]["grad_norm"] > 4 * CLIP  # clipping is at work
    # Gradients (after fp16 unscaling and clipping), parameters after the step, running statistics.
    for got, expected in zip(two[0] + two[1] + two[3], one[0] + one[1] + one[3]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    for name, value in one[2].items():
        torch.testing.assert_close(two[2][name], value, rtol=1e-12, atol=1e-15)
    assert len(one[3]) > 0 if "model.batch_norm=running" in overrides else True


@pytest.mark.parametrize("algorithm", ["maml", "protonet", "metalstm"])
def test_test_episodes_score_the_same_on_workers(make_config, tmp_path, float64_tasks, algorithm):
    trainer = Trainer(
        make_config(f"algorithm={algorithm}", *CHUNKED[algorithm], "model.hidden=8"), tmp_path
    )
    learner = trainer.learner.double().eval()
    tasks = float64_tasks[4]
    with torch.no_grad():
        learner.task_workers = 1
        expected = evaluate_batch(learner, tasks, contextlib.nullcontext)
        learner.task_workers = 2
        got = evaluate_batch(learner, tasks, contextlib.nullcontext)
    for g, e in zip(got, expected):
        assert g.shape == (4,)
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)


def maml_run(make_config, *overrides: str):
    return make_config(
        "algorithm=maml",
        "algorithm.task_workers=2",
        "model.hidden=16",
        "episode.meta_batch_size=4",
        "train.steps=12",
        "train.val_every=6",
        "train.log_every=3",
        "eval.episodes=20",
        *overrides,
    )


def lines(run_dir) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "tasks_per_s"}
        for line in (run_dir / "metrics.jsonl").open()
    ]


def results(run_dir) -> dict:
    found = json.loads((run_dir / "results.json").read_text())
    return {k: v for k, v in found.items() if k not in ("wall_time_s", "config")}


def test_runs_on_two_workers_are_bit_identical_and_a_killed_one_resumes_to_the_same(
    make_config, tmp_path, monkeypatch
):
    for name in ("first", "second"):
        trainer = Trainer(maml_run(make_config), tmp_path / name)
        assert trainer.learner.task_workers == 2
        trainer.run()
    assert results(tmp_path / "first") == results(tmp_path / "second")
    assert lines(tmp_path / "first") == lines(tmp_path / "second")

    # Killed in step 9, inside a worker thread, after last.pt of step 6: the next start resumes.
    killed = Trainer(maml_run(make_config), tmp_path / "killed")
    forward, calls = type(killed.learner).forward, {"n": 0}

    def interrupted(self, *args, **kwargs):
        if killed.step == 8 and threading.current_thread() is not threading.main_thread():
            calls["n"] += 1
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(killed.learner), "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    assert calls["n"] >= 1
    monkeypatch.setattr(type(killed.learner), "forward", forward)
    Trainer(maml_run(make_config), tmp_path / "killed").run()
    assert results(tmp_path / "killed") == results(tmp_path / "first")
    assert lines(tmp_path / "killed")[-1] == lines(tmp_path / "first")[-1]


def test_a_failing_task_is_raised_in_the_caller_and_the_workers_stay_usable():
    model = nn.Linear(2, 2)

    def work(runner: nn.Module, item: int) -> int:
        if item == 3:
            raise ValueError("task 3")
        return item * 10

    with pytest.raises(ValueError, match="task 3"):
        list(in_order(model, list(range(8)), work, workers=2, threads=1))
    assert list(in_order(model, list(range(8)), lambda r, i: (i, r is model), 2, 1)) == [
        (i, False) for i in range(8)
    ]


def test_auto_takes_one_worker_per_thread_at_most_one_per_chunk(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert threads_for("auto", 32) == (4, 1)
    assert threads_for("auto", 2) == (2, 2)
    assert threads_for(2, 32) == (2, 2)
    assert threads_for(1, 32) == (1, 4)
    assert threads_for("auto", 32, pays=False) == (1, 4)  # where workers measured no faster
    assert threads_for(2, 32, pays=False) == (2, 2)  # asked for: given
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # OMP_NUM_THREADS=1, as torchrun sets
    assert threads_for("auto", 32) == (1, 1)


@pytest.mark.parametrize(
    "overrides, training, evaluation",
    [
        (("algorithm=maml", "algorithm.adaptation_steps=5"), True, True),
        (("algorithm=maml", "algorithm.adaptation_steps=10"), True, True),
        (("algorithm=metasgd", "algorithm.adaptation_steps=5"), True, True),
        (("algorithm=maml", "algorithm.adaptation_steps=3"), False, True),  # no gain measured
        (("algorithm=fomaml", "algorithm.adaptation_steps=5"), False, True),  # slower measured
        (("algorithm=anil", "algorithm.adaptation_steps=5"), False, False),  # the body once
        (("algorithm=protonet",), False, False),  # slower in training, the same in evaluation
        (("algorithm=metalstm",), False, False),
    ],
)
def test_auto_uses_workers_where_the_benchmark_measured_them_faster(
    make_config, tmp_path, overrides, training, evaluation
):
    learner = Trainer(make_config(*overrides), tmp_path).learner
    assert (training_pays(learner), evaluation_pays(learner)) == (training, evaluation)


@pytest.mark.parametrize(
    "overrides, device, expected",
    [
        (("algorithm=maml",), "cpu", "auto"),
        (("algorithm=maml",), "cuda", 1),  # batched on CUDA instead
        (("algorithm=feat",), "cpu", 1),  # dropout: one generator for every thread
        (("algorithm=protonet", "model=resnet12", "model.drop_rate=0.1"), "cpu", 1),
    ],
)
def test_auto_is_one_worker_where_workers_would_not_help_or_would_change_the_numbers(
    make_config, tmp_path, overrides, device, expected
):
    learner = Trainer(make_config(*overrides), tmp_path).learner
    assert resolve_task_workers("auto", learner, torch.device(device)) == expected


@pytest.mark.parametrize(
    "overrides, words",
    [
        (("algorithm=maml", "algorithm.task_workers=0"), "not auto or a number"),
        (("algorithm=maml", "algorithm.task_workers=two"), "not auto or a number"),
        (("algorithm=feat", "algorithm.task_workers=2"), "draws random numbers"),
    ],
)
def test_task_workers_that_cannot_run_are_one_line_naming_the_fix(
    make_config, tmp_path, overrides, words
):
    message = one_line_error(lambda: Trainer(make_config(*overrides), tmp_path / "run"))
    assert words in message and "algorithm.task_workers=" in message
    assert not (tmp_path / "run").exists()


def test_two_workers_on_cuda_or_for_a_learner_that_does_not_split_are_refused(
    make_config, tmp_path
):
    maml = Trainer(make_config("algorithm=maml"), tmp_path / "maml").learner
    assert "set algorithm.task_workers=1" in one_line_error(
        lambda: resolve_task_workers(2, maml, torch.device("cuda"))
    )
    reptile = Trainer(make_config("algorithm=reptile"), tmp_path / "reptile").learner
    assert "does not split" in one_line_error(
        lambda: resolve_task_workers(2, reptile, torch.device("cpu"))
    )


def test_a_resumed_run_may_change_its_task_workers():
    from metarun.config import config_changes

    old = {"algorithm": {"task_workers": "auto", "inner_lr": 0.4}}
    assert config_changes(old, {"algorithm": {"task_workers": 1, "inner_lr": 0.4}}) == []
    assert config_changes({"algorithm": {"inner_lr": 0.4}}, old) == []  # a run from before the key
