"""Running a per-task computation over the tasks of a batch: `torch.func.vmap` or a Python loop;
and how many tasks one backward pass takes.

`algorithm.task_batching` picks: "vmap" maps the function over the task dimension in one call,
"loop" calls it once per task and stacks the outputs, "auto" is a loop on the CPU and vmap on CUDA.
Both give the same numbers up to rounding (the algorithms' tests compare them); which is faster
depends on the device (scripts/bench.py).

`algorithm.task_chunk` sets how many tasks the trainer backpropagates at a time (gradient
accumulation over the meta-batch, see `MetaLearner.task_chunks`): peak memory holds one chunk's
graph. "auto" is 1 where the tasks run in a loop (they run one by one anyway, so nothing is lost)
and the whole meta-batch where vmap runs them together.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError

CHOICES = ("auto", "vmap", "loop")


def check_task_batching(task_batching: str, model: nn.Module | None = None) -> str:
    """The task batching to use: `task_batching`, except that a backbone keeping running batch-norm
    statistics (model.batch_norm=running) runs its tasks in a loop, since vmap cannot update them.
    MetarunError naming the key and the fix when `task_batching` is not one of CHOICES."""
    if task_batching not in CHOICES:
        raise MetarunError(
            f"algorithm.task_batching={task_batching!r} is not one of {', '.join(CHOICES)}; "
            f"use auto (vmap on CUDA, loop on CPU)"
        )
    if getattr(model, "batch_norm", "task") == "running":
        if task_batching == "vmap":
            raise MetarunError(
                "algorithm.task_batching=vmap cannot update the running statistics of "
                "model.batch_norm=running; use algorithm.task_batching=loop (auto picks it) "
                "or model.batch_norm=task"
            )
        return "loop"
    return task_batching


def resolve_task_batching(task_batching: str, device: torch.device) -> str:
    """ "auto" -> a loop on the CPU (scripts/bench.py: vmap ran at 0.3-0.45x its speed there) and vmap
    on CUDA, where batching small convolutions usually pays (not yet measured here: no GPU)."""
    if task_batching != "auto":
        return task_batching
    return "vmap" if device.type == "cuda" else "loop"


def check_task_chunk(task_chunk: int | str) -> int | str:
    """`task_chunk` if it is "auto" or a whole number of tasks >= 1; MetarunError naming the fix otherwise."""
    if task_chunk == "auto" or (
        isinstance(task_chunk, int) and not isinstance(task_chunk, bool) and task_chunk >= 1
    ):
        return task_chunk
    raise MetarunError(
        f"algorithm.task_chunk={task_chunk!r} is not auto or a number of tasks >= 1; use auto "
        "(one task at a time in a loop, the whole meta-batch under vmap) or e.g. algorithm.task_chunk=8"
    )


def chunk_tasks(tasks: TaskBatch, task_chunk: int | str, task_batching: str) -> list[TaskBatch]:
    """`tasks` in consecutive chunks of `task_chunk` tasks ("auto": see the module docstring)."""
    if task_chunk == "auto":
        looped = resolve_task_batching(task_batching, tasks.support_x.device) == "loop"
        task_chunk = 1 if looped else len(tasks)
    return tasks.split(task_chunk)


def map_tasks(
    fn: Callable[..., Any],
    task_batching: str,
    *args: Any,
    in_dims: Sequence[int | None] | None = None,
    randomness: str = "error",
) -> Any:
    """`fn` on each task's slice of `args`, the outputs stacked along a new first (task) dim.

    in_dims: per argument, 0 when it is batched over the tasks along dim 0, None when every task
    shares it (default: all batched). The outputs may be tensors, tuples and dicts of them.
    The device that "auto" resolves on is that of the first batched argument.
    """
    in_dims = tuple(in_dims) if in_dims is not None else (0,) * len(args)
    batched = [arg for arg, dim in zip(args, in_dims) if dim is not None]
    first = next(iter(batched[0].values())) if isinstance(batched[0], dict) else batched[0]
    if resolve_task_batching(task_batching, first.device) == "vmap":
        return torch.func.vmap(fn, in_dims=in_dims, randomness=randomness)(*args)
    per_task = [
        fn(*(arg if dim is None else task_slice(arg, t) for arg, dim in zip(args, in_dims)))
        for t in range(first.shape[0])
    ]
    return stack_outputs(per_task)


def task_slice(arg: Tensor | dict[str, Tensor], t: int) -> Tensor | dict[str, Tensor]:
    """Task t of a batched tensor, or of each tensor of a dict."""
    return {name: value[t] for name, value in arg.items()} if isinstance(arg, dict) else arg[t]


def stack_outputs(outputs: list[Any]) -> Any:
    """The per-task outputs of a loop stacked as vmap returns them: tensors `[T, ...]`, in the same
    tuples and dicts."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.stack(outputs)
    if isinstance(first, dict):
        return {name: stack_outputs([out[name] for out in outputs]) for name in first}
    return tuple(stack_outputs(list(parts)) for parts in zip(*outputs))
