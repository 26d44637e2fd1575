"""Random few-shot batches and learner set-up shared by the algorithms' math tests (no real data)."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from metarun.data.tasks import TaskBatch
from metarun.models.layers import TaskBatchNorm


def random_tasks(
    T=3,
    n_way=5,
    k_shot=1,
    queries=2,
    image_size=28,
    dtype=torch.float64,
    seed=0,
    shuffled=True,
    n_classes: int | None = None,
    channels: int = 1,
) -> TaskBatch:
    """T tasks of Gaussian-noise images. `shuffled`: support items in a random order per task, as
    the sampler gives them (else class by class); `n_classes`: also draw `classes` from that many."""
    g = torch.Generator().manual_seed(seed)
    ordered = torch.arange(n_way).repeat_interleave(k_shot)
    support_y = (
        torch.stack([ordered[torch.randperm(n_way * k_shot, generator=g)] for _ in range(T)])
        if shuffled
        else ordered.repeat(T, 1)
    )
    classes = (
        None
        if n_classes is None
        else torch.stack([torch.randperm(n_classes, generator=g)[:n_way] for _ in range(T)])
    )
    return TaskBatch(
        torch.randn(T, n_way * k_shot, channels, image_size, image_size, generator=g).to(dtype),
        support_y,
        torch.randn(T, n_way * queries, channels, image_size, image_size, generator=g).to(dtype),
        torch.arange(n_way).repeat_interleave(queries).repeat(T, 1),
        n_way,
        classes,
    )


def perturb_batch_norm(module: nn.Module, scale: float = 0.3) -> nn.Module:
    """Batch-norm affine parameters (every TaskBatchNorm's) moved off their initial 1 and 0 (global
    torch RNG), so that the tests exercise their gradients and updates."""
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, TaskBatchNorm):
                for p in norm.parameters():
                    p.add_(scale * torch.randn_like(p))
    return module


def max_abs_diff(a, b) -> float:
    """The largest |a - b| over two tensors, two sequences of tensors, or two dicts of them by name."""
    if isinstance(a, Tensor):
        return (a - b).abs().max().item()
    if isinstance(a, Mapping):
        assert a.keys() == b.keys()
        a, b = list(a.values()), [b[name] for name in a]
    assert len(a) == len(b)
    return max(max_abs_diff(x, y) for x, y in zip(a, b))


def meta_gradient(
    learner: nn.Module, tasks: TaskBatch
) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
    """The learner's loss, the gradient of each of its parameters (in order), and its metrics."""
    learner.zero_grad()
    loss, metrics = learner(tasks)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in learner.parameters()], metrics


def assert_vmap_matches_loop(
    make_learner: Callable[[str], nn.Module], tasks: TaskBatch, grad_tol: float = 1e-10
) -> float:
    """The learner that `make_learner(task_batching)` builds gives the same loss, meta-gradient of
    every parameter, diagnostics and evaluation with "vmap" as with "loop" (float64 tolerances).
    Returns the largest gradient difference."""
    results = {}
    for mode in ("loop", "vmap"):
        learner = make_learner(mode)
        torch.manual_seed(0)  # the same random choices in both (Reptile's mini-batches)
        loss, metrics = learner(tasks, diagnostics=True)
        loss.backward()
        with torch.no_grad():
            results[mode] = (
                loss.detach(),
                [p.grad for p in learner.parameters()],
                metrics,
                learner.evaluate(tasks),
            )
    (loss_l, grads_l, metrics_l, eval_l), (loss_v, grads_v, metrics_v, eval_v) = (
        results["loop"],
        results["vmap"],
    )
    assert [g is None for g in grads_l] == [g is None for g in grads_v]
    diff = max_abs_diff(
        [g for g in grads_l if g is not None], [g for g in grads_v if g is not None]
    )
    print(f"vmap vs loop: max abs meta-gradient difference {diff:.1e}")
    torch.testing.assert_close(loss_l, loss_v, rtol=0, atol=1e-12)
    assert diff < grad_tol
    for key in metrics_l:
        torch.testing.assert_close(metrics_l[key], metrics_v[key], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eval_l, eval_v, rtol=0, atol=1e-12)
    return diff
