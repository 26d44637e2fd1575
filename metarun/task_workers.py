"""The tasks of a meta-batch on several CPU threads at once (`algorithm.task_workers`), with the
same numbers as one after another.

On a CPU of C cores one step of second-order MAML is mostly small convolutions, and C intra-op
threads on one of them wait on each other; C tasks side by side, each on one thread, keep the cores
busy (scripts/bench.py). `algorithm.task_workers=N` runs the chunks of a meta-batch
(`MetaLearner.task_chunks`) on N worker threads, each with C // N intra-op threads; "auto" takes
N = C (torch.get_num_threads(), so OMP_NUM_THREADS=1, as torchrun sets it, means one), at most one
per chunk, where the benchmark measured a gain (`training_pays`, `evaluation_pays`), and 1
elsewhere, on CUDA, and for a learner that draws random numbers in training (dropout, DropBlock:
one generator shared by the threads would hand them out in whichever order they ran).
1 is the plain loop in `metarun.trainer.meta_backward`.

Exact, whatever thread finished first:
  - every worker has its own copy of the learner (`replica`): its modules are new objects over the
    same parameter and buffer tensors, since `functional_call` and the batch norms' per-pass
    settings change attributes of the module they run on;
  - a worker takes the next chunk in task order, computes its meta-gradient into tensors of its own
    (`torch.autograd.grad`) and leaves the running batch-norm statistics it recorded pending in its
    copy; the calling thread takes the results in chunk order (`in_order`), adds the gradients into
    `.grad` in that order and appends the statistics in that order, which is the arithmetic of the
    plain loop: the same sums in the same order, so the same bits where each chunk's gradient is
    (float64: equal; float32 as far as oneDNN's kernels give the same bits on one thread as on two,
    which tests/test_task_workers.py checks on the runs it makes).
Memory holds up to N chunks' graphs at once instead of one.
"""

from __future__ import annotations

import copy
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from metarun.algorithms.base import MetaLearner
from metarun.algorithms.maml import MAML
from metarun.errors import MetarunError
from metarun.models.layers import add_statistics, take_statistics

Item = TypeVar("Item")


def check_task_workers(task_workers: Any) -> int | str:
    """`task_workers` if it is "auto" or a whole number >= 1; MetarunError naming the fix otherwise."""
    if task_workers == "auto" or (
        isinstance(task_workers, int) and not isinstance(task_workers, bool) and task_workers >= 1
    ):
        return task_workers
    raise MetarunError(
        f"algorithm.task_workers={task_workers!r} is not auto or a number of threads >= 1; use auto "
        "(one per CPU core PyTorch uses) or e.g. algorithm.task_workers=2 (1: one task after another)"
    )


def splits_tasks(learner: nn.Module) -> bool:
    """Whether `learner` splits its meta-batch into chunks (`task_chunks`), which workers can share."""
    return type(learner).task_chunks is not MetaLearner.task_chunks


def draws_random_numbers(module: nn.Module) -> str | None:
    """What in `module` draws random numbers in training (a dropout or DropBlock rate), or None."""
    for name, sub in module.named_modules():
        rate = getattr(sub, "p", None) if isinstance(sub, nn.modules.dropout._DropoutNd) else None
        rate = rate if rate is not None else getattr(sub, "drop_rate", None)
        if isinstance(rate, (int, float)) and rate > 0:
            return f"{name or type(module).__name__} (rate {rate})"
    return None


def resolve_task_workers(
    task_workers: int | str, learner: nn.Module, device: torch.device
) -> int | str:
    """`task_workers` as the learner can run it: 1 where workers cannot help or would change the
    numbers ("auto"), a MetarunError naming the fix where the user asked for them there."""
    task_workers = check_task_workers(task_workers)
    if task_workers == 1:
        return 1
    asked = f"algorithm.task_workers={task_workers}"
    if not splits_tasks(learner):
        if task_workers == "auto":
            return 1
        raise MetarunError(
            f"{asked}: {type(learner).__name__} does not split its meta-batch into tasks; drop the key"
        )
    if device.type != "cpu":
        if task_workers == "auto":
            return 1
        raise MetarunError(
            f"{asked} runs tasks on CPU threads, and this run is on {device.type} (where the "
            "tasks are batched instead); set algorithm.task_workers=1 or auto"
        )
    random = draws_random_numbers(learner)
    if random:
        if task_workers == "auto":
            return 1
        raise MetarunError(
            f"{asked}: {random} draws random numbers in training, which threads would take from "
            "one generator in whichever order they ran; set algorithm.task_workers=1 or the rate to 0"
        )
    return task_workers


# Where "auto" uses workers: where scripts/bench.py measured them faster than one task after
# another on every intra-op thread (2-core CPU, Conv4 on 28x28, 5-way 1-shot, meta-batch 32).
# Meta-training: second-order MAML at 5 inner steps 1.07-1.25x, at 10 1.26x; at 1-3 steps no
# gain; first-order MAML and ProtoNet 0.8-0.9x (their larger kernels keep two threads busy).
# Evaluation (scripts/bench_workers.py): MAML's test-time adaptation 1.11x at 3 steps, 1.21x at
# 10; ProtoNet 0.95x.
MIN_SECOND_ORDER_STEPS = 5


def adapts_whole_network(learner: nn.Module) -> bool:
    """Whether `learner` runs MAML's inner loop through the whole network (the MAML family and
    Meta-SGD; not ANIL's head alone, whose cost is one forward pass of the body, as ProtoNet's)."""
    return isinstance(learner, MAML) and not learner.body_once


def training_pays(learner: nn.Module) -> bool:
    """Whether "auto" runs meta-training's chunks on workers: a second-order inner loop through the
    whole network of at least MIN_SECOND_ORDER_STEPS steps."""
    return (
        adapts_whole_network(learner)
        and not learner.first_order
        and learner.adaptation_steps >= MIN_SECOND_ORDER_STEPS
    )


def evaluation_pays(learner: nn.Module) -> bool:
    """Whether "auto" scores test episodes on workers: an inner loop through the whole network."""
    return adapts_whole_network(learner)


def threads_for(task_workers: int | str, chunks: int, pays: bool = True) -> tuple[int, int]:
    """(worker threads, intra-op threads each) for `chunks` chunks: "auto" is one worker per thread
    PyTorch uses now, at most one per chunk, where workers `pays` (training_pays, evaluation_pays),
    else one; the threads are shared out among the workers."""
    budget = torch.get_num_threads()
    if task_workers == "auto" and not pays:
        return 1, budget
    workers = budget if task_workers == "auto" else int(task_workers)
    workers = max(1, min(workers, chunks))
    return workers, max(1, budget // workers)


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """The process's pool of `workers` threads with `threads` intra-op threads each (made once).
    torch.set_num_threads in a thread sets that thread's own OpenMP team size."""
    with _pools_lock:
        if (workers, threads) not in _pools:
            _pools[workers, threads] = ThreadPoolExecutor(
                workers,
                thread_name_prefix="metarun-task",
                initializer=torch.set_num_threads,
                initargs=(threads,),
            )
        return _pools[workers, threads]


def replica(learner: nn.Module) -> nn.Module:
    """A copy of `learner` whose modules are its own objects and whose parameters and buffers are
    `learner`'s tensors themselves (what a worker thread runs on)."""
    shared = {id(t): t for t in itertools.chain(learner.parameters(), learner.buffers())}
    return copy.deepcopy(learner, shared)


def in_order(
    learner: nn.Module,
    items: Sequence[Item],
    work: Callable[[nn.Module, Item], Any],
    workers: int,
    threads: int,
) -> Iterator[Any]:
    """`work(copy, item)` for every item, on `workers` threads, each with a copy of `learner`,
    yielded in item order; each item's pending batch-norm statistics are added to `learner`'s as
    it is yielded. Grad mode is the caller's. An exception in a worker is raised here; the other
    workers finish the item they hold and take no more."""
    copies = [replica(learner) for _ in range(workers)]
    grad_mode = torch.is_grad_enabled()
    taken = iter(range(len(items)))
    take_lock = threading.Lock()
    done: dict[int, Any] = {}
    failed: list[BaseException] = []
    ready = threading.Condition()

    def run(own: nn.Module) -> None:
        with torch.set_grad_enabled(grad_mode):
            while not failed:
                with take_lock:
                    index = next(taken, None)
                if index is None:
                    return
                try:
                    result = (work(own, items[index]), take_statistics(own))
                except BaseException as error:  # handed to the caller, which raises it
                    with ready:
                        failed.append(error)
                        ready.notify_all()
                    return
                with ready:
                    done[index] = result
                    ready.notify_all()

    running = [pool(workers, threads).submit(run, own) for own in copies]
    try:
        for index in range(len(items)):
            with ready:
                ready.wait_for(lambda index=index: index in done or bool(failed))
                if index not in done:
                    raise failed[0]
                result, statistics = done.pop(index)
            add_statistics(learner, statistics)
            yield result
    finally:
        with ready:
            failed.append(GeneratorExit())  # the workers take no more items
        wait(running)
