"""Peer libraries' meta-training steps, as benchmark baselines: higher's and learn2learn's MAML,
easyfsl's Prototypical Networks.

Each factory takes the caller's own network and returns `step(tasks) -> float` for a
metarun.data.tasks.TaskBatch of T tasks. The step runs each task as the library's own example does,
with one `backward()` per task of the query loss divided by T, so the network's `.grad` accumulates
the mean over tasks, as metarun's meta-loss does. The caller zeroes the grads before and steps its
own outer optimizer after; the float is the mean query loss. Each library is imported inside its
factory, so this file imports without them (scripts/install_peers.sh installs them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from metarun.data.tasks import TaskBatch

Step = Callable[["TaskBatch"], float]


def higher_maml(
    model: nn.Module, inner_lr: float, adaptation_steps: int, first_order: bool
) -> Step:
    """MAML with higher 0.2.1, following its examples/maml-omniglot.py. The inner SGD optimizer is
    built once. Each task gets `innerloop_ctx(copy_initial_weights=False)` and
    `diffopt.step(support_loss)`, then `query_loss.backward()`. The example sums over tasks; this
    step divides by T.

    First order: `track_higher_grads=False` detaches the fast weights at each step
    (DifferentiableOptimizer.step), so the query loss's `backward()` would never reach `model`. Its
    grads would stay None (higher issues #63, #129). As the maintainers say in #63, the query loss
    is differentiated with respect to the last fast weights and those grads go onto `model`."""
    import higher

    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)

    def step(tasks: TaskBatch) -> float:
        n_tasks, total = len(tasks), 0.0
        for t in range(n_tasks):
            with higher.innerloop_ctx(
                model, inner_opt, copy_initial_weights=False, track_higher_grads=not first_order
            ) as (fmodel, diffopt):
                for _ in range(adaptation_steps):
                    diffopt.step(F.cross_entropy(fmodel(tasks.support_x[t]), tasks.support_y[t]))
                query_loss = F.cross_entropy(fmodel(tasks.query_x[t]), tasks.query_y[t])
                if first_order:
                    params = [p for p in model.parameters() if p.requires_grad]
                    # fmodel.parameters() and model.parameters() list the same tensors in the same order.
                    fast = [
                        f
                        for f, p in zip(fmodel.parameters(), model.parameters())
                        if p.requires_grad
                    ]
                    for p, g in zip(params, torch.autograd.grad(query_loss / n_tasks, fast)):
                        p.grad = g if p.grad is None else p.grad.add_(g)
                else:
                    (query_loss / n_tasks).backward()
            total = total + query_loss.detach()  # .item() once at the end: no device sync per task
        return float(total) / n_tasks

    return step


def learn2learn_maml(
    model: nn.Module, inner_lr: float, adaptation_steps: int, first_order: bool
) -> Step:
    """MAML with learn2learn 0.2.0, following its examples/vision/maml_omniglot.py:
    `l2l.algorithms.MAML` wraps the network once, and each task takes `learner = maml.clone()` and
    `learner.adapt(support_loss)`, then `query_loss.backward()`. The example scales the summed grads
    by 1/T after the loop; this step divides each task's loss by T instead. `maml.module` is
    `model` itself, so the grads land on `model.parameters()`."""
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order)

    def step(tasks: TaskBatch) -> float:
        n_tasks, total = len(tasks), 0.0
        for t in range(n_tasks):
            learner = maml.clone()
            for _ in range(adaptation_steps):
                learner.adapt(F.cross_entropy(learner(tasks.support_x[t]), tasks.support_y[t]))
            query_loss = F.cross_entropy(learner(tasks.query_x[t]), tasks.query_y[t])
            (query_loss / n_tasks).backward()
            total = total + query_loss.detach()
        return float(total) / n_tasks

    return step


def easyfsl_protonet(backbone: nn.Module) -> Step:
    """Prototypical Networks with easyfsl 1.5.0, following its notebooks/episodic_training.ipynb:
    `process_support_set(support)`, `scores = model(query)`, `cross_entropy(scores, labels)
    .backward()`. The notebook steps the optimizer after every episode. Here T episodes accumulate,
    each loss divided by T.

    The scores are easyfsl's own: minus the euclidean distance (`-torch.cdist`), not its square as
    in metarun and the paper, so the two meta-gradients differ. Also, easyfsl embeds the support
    and the query sets in two backbone calls, while metarun embeds them in one. A batch-norm
    backbone that normalizes with batch statistics (metarun's `batch_norm=task` always,
    `running` in training) then normalizes each set on its own statistics."""
    from easyfsl.methods import PrototypicalNetworks

    classifier = PrototypicalNetworks(backbone)

    def step(tasks: TaskBatch) -> float:
        n_tasks, total = len(tasks), 0.0
        for t in range(n_tasks):
            classifier.process_support_set(tasks.support_x[t], tasks.support_y[t])
            query_loss = F.cross_entropy(classifier(tasks.query_x[t]), tasks.query_y[t])
            (query_loss / n_tasks).backward()
            total = total + query_loss.detach()
        return float(total) / n_tasks

    return step


# name -> (metarun method it is a baseline for, factory). The MAML factories take
# (model, inner_lr, adaptation_steps, first_order) and the ProtoNet one takes (backbone).
PEERS: dict[str, tuple[str, Callable[..., Step]]] = {
    "higher": ("MAML", higher_maml),
    "learn2learn": ("MAML", learn2learn_maml),
    "easyfsl": ("ProtoNet", easyfsl_protonet),
}
_MODULES = {"higher": "higher", "learn2learn": "learn2learn", "easyfsl": "easyfsl.methods"}


def available() -> dict[str, str | None]:
    """For each peer: None if it imports, else the error. The check catches any exception, not just
    ImportError: learn2learn imports gym and its datasets on import, and those can fail in other ways."""
    status: dict[str, str | None] = {}
    for name in PEERS:
        try:
            importlib.import_module(_MODULES[name])
            status[name] = None
        except Exception as error:  # noqa: BLE001
            status[name] = f"{type(error).__name__}: {error}"
    return status
