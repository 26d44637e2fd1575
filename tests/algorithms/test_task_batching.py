"""map_tasks: the loop and vmap give the same outputs, in the same structure; chunk_tasks splits a
meta-batch for gradient accumulation."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms.task_batching import check_task_batching, chunk_tasks, map_tasks
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError


def one_task(shared: dict[str, torch.Tensor], x: torch.Tensor, scale: torch.Tensor):
    y = x @ shared["w"] * scale  # [B, 2]
    return {"y": y, "norm": y.norm()}, (y.sum(), scale * 2)


@pytest.mark.parametrize("task_batching", ["loop", "vmap", "auto"])
def test_every_choice_equals_applying_the_function_task_by_task(task_batching):
    torch.manual_seed(0)
    shared = {"w": torch.randn(3, 2, dtype=torch.float64)}
    x, scale = torch.randn(4, 5, 3, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    out = map_tasks(one_task, task_batching, shared, x, scale, in_dims=(None, 0, 0))
    for t in range(4):
        expected = one_task(shared, x[t], scale[t])
        torch.testing.assert_close(out[0]["y"][t], expected[0]["y"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[0]["norm"][t], expected[0]["norm"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[1][0][t], expected[1][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[1][1][t], expected[1][1], rtol=0, atol=0)
    assert out[0]["y"].shape == (4, 5, 2) and out[1][0].shape == (4,)


def test_a_batched_dict_argument_is_sliced_per_task():
    params = {"a": torch.arange(6.0).view(3, 2), "b": torch.ones(3)}
    loop = map_tasks(lambda p: p["a"].sum() + p["b"], "loop", params)
    vmap = map_tasks(lambda p: p["a"].sum() + p["b"], "vmap", params)
    torch.testing.assert_close(loop, torch.tensor([2.0, 6.0, 10.0]))
    torch.testing.assert_close(vmap, loop)


def test_an_unknown_choice_names_the_key_and_the_choices():
    with pytest.raises(
        MetarunError, match=r"algorithm.task_batching='vamp' is not one of auto, vmap, loop"
    ):
        check_task_batching("vamp")


@pytest.mark.parametrize(
    "task_chunk, task_batching, sizes",
    [
        ("auto", "loop", [1, 1, 1, 1, 1]),  # a loop runs the tasks one by one: one graph at a time
        ("auto", "vmap", [5]),  # vmap runs them together: one chunk
        (2, "loop", [2, 2, 1]),
        (8, "vmap", [5]),
    ],
)
def test_task_chunks_cover_the_batch_in_order(task_chunk, task_batching, sizes):
    tasks = TaskBatch(
        torch.arange(5.0).view(5, 1, 1),
        torch.zeros(5, 1, dtype=torch.long),
        torch.arange(5.0).view(5, 1, 1),
        torch.zeros(5, 1, dtype=torch.long),
        1,
        torch.arange(5).view(5, 1),
    )
    chunks = chunk_tasks(tasks, task_chunk, task_batching)
    assert [len(chunk) for chunk in chunks] == sizes
    assert torch.cat([chunk.query_x for chunk in chunks]).flatten().tolist() == [0, 1, 2, 3, 4]
    assert torch.cat([chunk.classes for chunk in chunks]).flatten().tolist() == [0, 1, 2, 3, 4]
