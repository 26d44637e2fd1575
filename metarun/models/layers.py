"""Layers that backbones and algorithms share: per-task batch norm in two modes, and a linear head.

Batch norm (`model.batch_norm`):
  task     each task is normalized with its own batch statistics, in training and evaluation, and
           no running statistics are kept. Transductive: a query's prediction depends on the other
           queries evaluated with it. MAML's code does this, and
             (a) under `torch.func.vmap` PyTorch's training-mode batch norm gives a wrong
                 second-order meta-gradient (relative error 1.5e-2 at one inner step in float64),
                 so the plain tensor version runs there;
             (b) per-task statistics make evaluation independent of how many episodes are batched.
  running  training normalizes each task with its own batch statistics and keeps running
           statistics for evaluation (`learner.eval()`), which then normalizes with them, so a
           query's prediction depends only on the support set and itself. Inductive, as the
           Prototypical Networks code evaluates (`model.eval()`).

Running statistics move once per meta-batch: each training pass records its tasks' batch
statistics, and `commit_running_statistics(learner)`, called by the trainer's `meta_backward`
after the last chunk of a step, moves the running mean and (unbiased) variance towards their mean
over every recorded task, with momentum 0.1 (nn.BatchNorm2d's). So the result is the same whether
the tasks ran one by one (the CPU), all in one call (CUDA) or in chunks (`algorithm.task_chunk`).
Every training pass of a task counts once (MAML: each inner step's support pass and the query
pass), except passes inside a torch.func transform, whose statistics cannot leave it (Meta-LSTM's
support passes), and passes under `no_statistics_update(module)`, which diagnostics use so that a
logged step changes nothing a checkpoint holds.

Per-step batch norm (MAML++, Antoniou, Edwards & Storkey, 2019: BNWB and BNRS): `per_step_batch_norm(
module, steps)` gives every batch norm one scale and shift (and, in running mode, one pair of running
statistics) per inner-loop step, `[steps, C]`, and `at_inner_step(module, step)` tells them which row
to use; steps past the last row use the last. Either mode: "task" with per-step rows normalizes with
batch statistics and keeps no running ones (what MAML++'s code computes: its layer always calls
batch norm in training mode, so its per-step running statistics are kept but never used), "running"
keeps and evaluates with per-step running statistics (what the paper describes).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.errors import MetarunError
from metarun.vmap import is_transformed, is_vmapped

BATCH_NORM_MODES = ("task", "running")


def check_batch_norm(mode: str) -> None:
    if mode not in BATCH_NORM_MODES:
        raise MetarunError(
            f"model.batch_norm={mode!r} is not one of {', '.join(BATCH_NORM_MODES)}; "
            "use model.batch_norm=task (transductive) or model.batch_norm=running (inductive)"
        )


def task_batch_norm(
    x: Tensor, n_tasks: int, weight: Tensor, bias: Tensor, eps: float = 1e-5
) -> Tensor:
    """Normalize `x [T*B, C, H, W]` per task and channel with the task's own batch statistics.

    PyTorch's fused kernel where it is exact; plain tensor operations under `torch.func.vmap`,
    where the fused kernel's second-order gradient is wrong (measured in float64 against the plain
    version: relative error 1.5e-2 at one inner step, 4.4e-2 at five; 1e-14 outside vmap).
    """
    if is_vmapped(x):
        return plain_task_batch_norm(x, n_tasks, weight, bias, eps)
    if n_tasks == 1:
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    # Tasks side by side as channels: [B, T*C, H, W], so one kernel call normalizes per task.
    xt = x.unflatten(0, (n_tasks, -1)).transpose(0, 1).flatten(1, 2)
    y = F.batch_norm(
        xt, None, None, weight.repeat(n_tasks), bias.repeat(n_tasks), training=True, eps=eps
    )
    return y.unflatten(1, (n_tasks, -1)).transpose(0, 1).flatten(0, 1)  # [T*B, C, H, W]


def plain_task_batch_norm(
    x: Tensor, n_tasks: int, weight: Tensor, bias: Tensor, eps: float = 1e-5
) -> Tensor:
    """task_batch_norm in plain mean/variance operations: exact to any order, also under vmap.

    y = (x - mean) / sqrt(var + eps) * weight + bias, mean and (biased) var over the B items and
    the H*W positions of one task. Statistics are taken in at least float32, so bf16/fp16 under
    autocast do not lose the variance; float64 stays float64.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xt = x.to(compute_dtype).unflatten(0, (n_tasks, -1))  # [T, B, C, H, W]
    var, mean = torch.var_mean(
        xt, dim=(1, 3, 4), correction=0, keepdim=True
    )  # [T, 1, C, 1, 1] each
    # Folded into one scale and shift per task and channel, so the full-size tensor is touched
    # by a single multiply-add (this layer dominates Conv4's time on a CPU).
    scale = torch.rsqrt(var + eps) * weight.view(1, 1, -1, 1, 1)  # [T, 1, C, 1, 1]
    shift = bias.view(1, 1, -1, 1, 1) - mean * scale  # [T, 1, C, 1, 1]
    y = torch.addcmul(shift, xt, scale)  # [T, B, C, H, W]
    return y.flatten(0, 1).to(x.dtype)  # [T*B, C, H, W]


class TaskBatchNorm(nn.Module):
    """Learnable affine batch norm in `mode` "task" or "running" (see the module docstring)."""

    def __init__(self, channels: int, mode: str = "task", eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        check_batch_norm(mode)
        self.mode, self.eps, self.momentum = mode, eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        if mode == "running":
            self.register_buffer("running_mean", torch.zeros(channels))
            self.register_buffer("running_var", torch.ones(channels))
        # This meta-batch's recorded statistics until committed, by per-step row (0 without rows),
        # one record per training pass in the order they ran: (sums over the pass's tasks of each
        # task's mean and variance [2, C], number of tasks). Summed at commit, so that passes run on
        # other threads (metarun.task_workers) join in task order. Not a buffer: a checkpoint never
        # holds it.
        self.pending: dict[int, list[tuple[Tensor, int]]] = {}
        self.counting = True  # False under no_statistics_update
        # Per-step rows (`per_step_batch_norm`): None, or how many; `step` is the inner step now.
        self.steps: int | None = None
        self.step = 0

    def make_per_step(self, steps: int) -> None:
        """One row of scale, shift (and running statistics) per inner step, each starting as now."""
        self.steps = steps
        self.weight = nn.Parameter(self.weight.detach().repeat(steps, 1))  # [S, C]
        self.bias = nn.Parameter(self.bias.detach().repeat(steps, 1))  # [S, C]
        if self.mode == "running":
            self.running_mean = self.running_mean.repeat(steps, 1)  # [S, C], still buffers
            self.running_var = self.running_var.repeat(steps, 1)

    def row(self) -> int | None:
        """The per-step row this pass uses (None without rows): the inner step, at most the last."""
        return None if self.steps is None else min(self.step, self.steps - 1)

    def forward(self, x: Tensor, n_tasks: int = 1) -> Tensor:
        row = self.row()
        weight, bias = (
            (self.weight, self.bias) if row is None else (self.weight[row], self.bias[row])
        )
        if self.mode == "task":
            return task_batch_norm(x, n_tasks, weight, bias, self.eps)
        if not self.training:  # inductive: every item on its own
            return F.batch_norm(
                x,
                self.running_mean if row is None else self.running_mean[row],
                self.running_var if row is None else self.running_var[row],
                weight,
                bias,
                training=False,
                eps=self.eps,
            )
        if is_vmapped(x):
            raise MetarunError(
                "model.batch_norm=running updates running statistics, which torch.func.vmap "
                "cannot do in place; set algorithm.task_batching=loop or model.batch_norm=task"
            )
        if self.counting and not is_transformed(
            x
        ):  # Meta-LSTM's support passes run inside torch.func.grad
            self.record_statistics(x.detach(), n_tasks)
        return task_batch_norm(x, n_tasks, weight, bias, self.eps)

    @torch.no_grad()
    def record_statistics(self, x: Tensor, n_tasks: int) -> None:
        """Add each task's batch mean and unbiased variance (as nn.BatchNorm2d keeps) to this meta-batch's."""
        xt = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(
            0, (n_tasks, -1)
        )  # [T, B, C, H, W]
        var, mean = torch.var_mean(
            xt, dim=(1, 3, 4), correction=1 if xt[0, :, 0].numel() > 1 else 0
        )  # [T, C]
        sums = torch.stack([mean.sum(0), var.sum(0)])  # [2, C]
        self.pending.setdefault(self.row() or 0, []).append((sums, n_tasks))

    @torch.no_grad()
    def commit(self) -> None:
        """One momentum step of the running statistics (of each per-step row that recorded some)
        towards the mean over the recorded tasks; nothing when none are recorded."""
        pending, self.pending = self.pending, {}
        for row, records in pending.items():
            sums, n_tasks = records[0]
            for more_sums, more_tasks in records[1:]:  # in the order the passes ran
                sums, n_tasks = sums + more_sums, n_tasks + more_tasks
            mean, var = (sums / n_tasks).unbind(0)  # [C] each
            running_mean, running_var = (
                (self.running_mean, self.running_var)
                if self.steps is None
                else (self.running_mean[row], self.running_var[row])  # views: updated in place
            )
            running_mean.lerp_(mean.to(running_mean.dtype), self.momentum)
            running_var.lerp_(var.to(running_var.dtype), self.momentum)


def commit_running_statistics(module: nn.Module) -> None:
    """End of a meta-batch: every running-mode batch norm in `module` takes one momentum step
    towards the mean of the statistics its training passes recorded since the last commit."""
    for norm in module.modules():
        if isinstance(norm, TaskBatchNorm):
            norm.commit()


def take_statistics(module: nn.Module) -> list[dict[int, list[tuple[Tensor, int]]]]:
    """The statistics `module`'s batch norms recorded and not yet committed, one entry per batch
    norm in module order; they are no longer pending in `module` (a task worker's copy hands
    what its tasks recorded to the learner, `add_statistics`)."""
    taken = []
    for norm in module.modules():
        if isinstance(norm, TaskBatchNorm):
            taken.append(norm.pending)
            norm.pending = {}
    return taken


def add_statistics(module: nn.Module, taken: list[dict[int, list[tuple[Tensor, int]]]]) -> None:
    """Append statistics taken from a copy of `module` (`take_statistics`) to its own pending ones,
    after those already there: as if the copy's passes had run on `module` itself, then."""
    norms = [norm for norm in module.modules() if isinstance(norm, TaskBatchNorm)]
    for norm, records in zip(norms, taken):
        for row, more in records.items():
            norm.pending.setdefault(row, []).extend(more)


def per_step_batch_norm(module: nn.Module, steps: int) -> list[str]:
    """Every TaskBatchNorm of `module` with `steps` per-step rows (see the module docstring).
    Returns the names of their parameters, as `module.named_parameters()` gives them."""
    names = []
    for prefix, norm in module.named_modules():
        if isinstance(norm, TaskBatchNorm):
            norm.make_per_step(steps)
            names += [f"{prefix}.{name}" if prefix else name for name, _ in norm.named_parameters()]
    return names


def at_inner_step(module: nn.Module, step: int) -> ContextManager[None]:
    """The per-step batch norms of `module` use row `step` inside (nothing changes for the others):
    the inner loop's support pass at step s uses row s, as does the query pass after that step's
    update (MAML++'s code indexes both by the step)."""
    norms = [m for m in module.modules() if isinstance(m, TaskBatchNorm) and m.steps is not None]
    return setting(norms, "step", step)


def no_statistics_update(module: nn.Module) -> ContextManager[None]:
    """Training passes of `module` inside do not count towards its running statistics: passes that
    only measure (diagnostics) leave the state as it was."""
    norms = [norm for norm in module.modules() if isinstance(norm, TaskBatchNorm)]
    return setting(norms, "counting", False)


@contextlib.contextmanager
def setting(objects: list[Any], attribute: str, value: Any) -> Iterator[None]:
    """Each object's `attribute` is `value` inside, and what it was before after."""
    before = [getattr(o, attribute) for o in objects]
    for o in objects:
        setattr(o, attribute, value)
    try:
        yield
    finally:
        for o, value_before in zip(objects, before):
            setattr(o, attribute, value_before)


class Backbone(nn.Module):
    """The protocol every backbone meets (Conv4, ResNet-12, ResNet-18, MLP), and the shared forward.

    A subclass builds its layers, then calls `self.finish(input_shape)`, and implements
    `features(h, n_tasks) -> map`: `[T*B, *input_shape] -> [T*B, *out_shape]` with every batch norm
    taking `n_tasks` (per-task statistics). It then has:
      in_shape      the input it was built for, e.g. (3, 84, 84)
      out_shape     the feature map's shape, worked out by running the layers once on that input
      out_features  its product: the embedding size
      batch_norm    "task" or "running" (metarun.models.layers)
      forward(x)    `[B, *in_shape] -> [B, D]` (one task) or `[T, B, *in_shape] -> [T, B, D]`
                    (each task normalized on its own). On the CPU tasks go one at a time: batching
                    them needs the per-task batch norm's transposes, which made ProtoNet 2.5x slower
                    than a per-task loop (scripts/bench.py).
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_features: int
    batch_norm: str = "task"

    def features(self, h: Tensor, n_tasks: int) -> Tensor:
        raise NotImplementedError

    def finish(self, in_shape: tuple[int, ...]) -> None:
        """Record the input shape and work out the output shape from it."""
        self.in_shape = tuple(in_shape)
        was_training = self.training
        with torch.no_grad():
            self.eval()  # a running-mode batch norm must not count this probe
            out = self.features(torch.zeros(2, *in_shape), 1)
        self.train(was_training)
        self.out_shape = tuple(out.shape[1:])
        self.out_features = int(out[0].numel())

    def forward(self, x: Tensor) -> Tensor:
        name, dims = type(self).__name__, len(self.in_shape)
        if x.dim() == dims + 2 and x.device.type == "cpu":
            return torch.stack([self(task) for task in x])  # [T, B, D]
        if x.dim() == dims + 2:
            n_tasks, items = x.shape[:2]
            h = x.flatten(0, 1)  # [T*B, ...]: one call for all tasks
        elif x.dim() == dims + 1:
            n_tasks, items = 1, None
            h = x
        else:
            raise MetarunError(
                f"{name} expects inputs [B, {', '.join(map(str, self.in_shape))}] or [T, B, ...], got "
                f"shape {tuple(x.shape)}; check the dataset transform"
            )
        if tuple(h.shape[1:]) != self.in_shape:
            got = tuple(h.shape[1:])
            fix = (
                " ".join(
                    f"model.{key}={have}"
                    for key, want, have in (
                        ("in_channels", self.in_shape[0], got[0]),
                        ("image_size", self.in_shape[-1], got[-1]),
                    )
                    if want != have
                )
                if len(got) == 3
                else f"model.in_features={got[0]}"
            )
            raise MetarunError(
                f"{name} was built for {'x'.join(map(str, self.in_shape))} inputs but got "
                f"{'x'.join(map(str, got))}; set {fix} (the defaults follow the dataset)"
            )
        h = self.features(h, n_tasks).flatten(1)  # [T*B, D]
        return h if items is None else h.unflatten(0, (n_tasks, items))  # [T, B, D]


class Classifier(nn.Module):
    """Backbone embedding followed by a linear head: `[B, C, H, W] -> [B, n_way]` logits."""

    def __init__(self, backbone: nn.Module, n_way: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_features, n_way)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def detached(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in params.items()}
