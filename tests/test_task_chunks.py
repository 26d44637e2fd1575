"""Gradient accumulation over the tasks of a meta-batch (`algorithm.task_chunk`): the trainer
backpropagates chunk by chunk, and the update is the one the whole batch at once would give."""

from __future__ import annotations

import copy

import pytest
import torch

from metarun.trainer import Trainer
from tests.conftest import one_line_error

# Each learner that splits its meta-batch, sized to run in a second or two.
CHUNKED = {
    "maml": ("algorithm.adaptation_steps=2", "algorithm.task_batching=loop"),
    "fomaml": ("algorithm.adaptation_steps=2", "algorithm.task_batching=loop"),
    "metasgd": ("algorithm.adaptation_steps=2", "algorithm.task_batching=loop"),
    "anil": ("algorithm.adaptation_steps=2", "algorithm.task_batching=loop"),
    "metalstm": (
        "algorithm.adaptation_steps=2",
        "algorithm.hidden_size=4",
        "algorithm.task_batching=loop",
    ),
    "protonet": (),
}
CLIP = 0.05  # far below these gradients' norms, so every update here is clipped


def steps_by_chunk(
    make_config,
    run_dir,
    algorithm: str,
    tasks,
    loss_scale: float,
    task_chunks,
    setting: str = "task_chunk",
    overrides: tuple[str, ...] = (),
) -> dict:
    """{value: (gradients, parameters after, metrics, buffers after)} of one float64 training step
    from the same start with each value of the learner's `setting` (task_chunk, task_workers)."""
    cfg = make_config(
        f"algorithm={algorithm}",
        *CHUNKED[algorithm],
        *overrides,
        "model.hidden=8",
        f"train.grad_clip={CLIP}",
        "optimizer=sgd",
        "optimizer.lr=1.0",
        "optimizer.momentum=0.0",
    )
    trainer = Trainer(cfg, run_dir)
    trainer.learner.double()
    start = copy.deepcopy(trainer.learner.state_dict())
    steps = {}
    for task_chunk in task_chunks:
        trainer.learner.load_state_dict(start)
        setattr(trainer.learner, setting, task_chunk)
        # An fp16 run's gradient scaler (its arithmetic does not need fp16 itself): the loss, and the
        # inner losses through forward's loss_scale, are scaled, and unscaled before clipping.
        trainer.scaler = torch.amp.GradScaler(
            "cpu", init_scale=loss_scale, enabled=loss_scale != 1.0
        )
        metrics = trainer.train_step(tasks, diagnostics=True)
        params = list(trainer.learner.parameters())
        steps[task_chunk] = (
            [p.grad.clone() for p in params],
            [p.detach().clone() for p in params],
            metrics,
            [b.clone() for b in trainer.learner.buffers()],
        )
    return steps


# Every learner with an fp16 scaler's loss scale; MAML also without one. 3 tasks in chunks of 1 and
# of 2 (2 + 1), 4 tasks one at a time.
CASES = [(algorithm, 2.0**12, 3, (1, 2)) for algorithm in CHUNKED] + [("maml", 1.0, 4, (1,))]


@pytest.mark.parametrize("algorithm, loss_scale, meta_batch, task_chunks", CASES)
def test_chunked_meta_gradient_equals_the_whole_batch_one(
    make_config, tmp_path, float64_tasks, algorithm, loss_scale, meta_batch, task_chunks
):
    steps = steps_by_chunk(
        make_config,
        tmp_path,
        algorithm,
        float64_tasks[meta_batch],
        loss_scale,
        (meta_batch, *task_chunks),
    )
    whole = steps[meta_batch]
    assert whole[2]["grad_norm"] > 4 * CLIP  # clipping is at work
    for task_chunk in task_chunks:
        chunked = steps[task_chunk]
        for got, expected in zip(chunked[0] + chunked[1], whole[0] + whole[1]):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
        for name, value in whole[2].items():
            torch.testing.assert_close(
                chunked[2][name].double(), value.double(), rtol=1e-6, atol=1e-9
            )


def test_a_real_run_one_task_at_a_time_ends_with_the_whole_batch_weights(make_config, tmp_path):
    """Through the whole trainer (sampling, chunks, optimizer, checkpoint), two steps: float32 sums in
    another order agree to rounding. Not trained accuracies, which amplify that rounding differently
    on each CPU; the exact equality is the float64 test above."""
    weights = {}
    for task_chunk in (1, 4):
        cfg = make_config(
            "algorithm=maml",
            "model.hidden=16",
            "episode.meta_batch_size=4",
            "train.steps=2",
            "train.val_every=2",
            "train.val_episodes=5",
            "eval.episodes=5",
            f"algorithm.task_chunk={task_chunk}",
            "algorithm.task_batching=loop",
        )
        Trainer(cfg, tmp_path / str(task_chunk)).run()
        weights[task_chunk] = torch.load(tmp_path / str(task_chunk) / "checkpoints" / "last.pt")[
            "learner"
        ]
    start = Trainer(
        make_config("algorithm=maml", "model.hidden=16"), tmp_path / "start"
    ).learner.state_dict()
    for name, value in weights[4].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-6)
        if value.is_floating_point() and name.endswith("weight"):
            assert not torch.equal(value, start[name])  # it did train


@pytest.mark.parametrize("value", [0, -2, "some"])
def test_a_task_chunk_that_is_not_a_count_of_tasks_is_one_line_naming_the_fix(
    make_config, tmp_path, value
):
    message = one_line_error(
        lambda: Trainer(
            make_config("algorithm=maml", f"algorithm.task_chunk={value}"), tmp_path / "run"
        )
    )
    assert f"algorithm.task_chunk={value!r}" in message and "auto" in message
    assert not (tmp_path / "run").exists()
