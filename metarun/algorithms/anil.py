"""Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness of MAML
(Raghu, Raghu, Bengio & Vinyals, 2020): ANIL, Almost No Inner Loop.

w'_i = w - alpha * grad_w L_support_i(w^T phi_theta(x))     (inner loop: the head w only; the body theta is not adapted)
(theta, w) <- (theta, w) - beta * grad_(theta, w) sum_i L_query_i(w'_i^T phi_theta(x))   (meta-update, by the trainer)

The body phi_theta is the same before and after adaptation, so its support and query features are
computed once per task and the inner loop runs on the linear head alone. ANIL is MAML with
`inner_params="head"`, where that shortcut lives (metarun.algorithms.maml); this class keeps ANIL's
name, config and defaults.
"""

from __future__ import annotations

from torch import nn

from metarun.algorithms.maml import BODY, HEAD, MAML, split_params

__all__ = ["ANIL", "BODY", "HEAD", "split_params"]


class ANIL(MAML):
    """ANIL over `Classifier(model, n_way)`: the head adapts in the inner loop, the body only in the
    outer loop (MAML with inner_params="head").

    inner_lr (alpha), inner_loss, adaptation_steps, eval_adaptation_steps, first_order: as MAML, for the head.
    task_batching: how the head's inner loop is mapped over tasks ("vmap" or "loop"; "auto": vmap
        on CUDA, loop on CPU). The body runs once per batch, outside that map, on `[T, B, C, H, W]`.
    msl_steps, lslr, first_order_until: MAML++'s options, as MAML's, for the head's inner loop
        (per-step batch norm would make the body differ by step: MAML with inner_params=head has it).
    Batch norm: support and query go through the body in separate calls, each task with its own
    statistics, as in MAML.
    """

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        inner_lr: float = 0.4,
        inner_loss: str = "mean",
        adaptation_steps: int = 1,
        eval_adaptation_steps: int = 3,
        first_order: bool = False,
        task_batching: str = "auto",
        task_chunk: int | str = "auto",
        msl_steps: int = 0,
        lslr: bool = False,
        first_order_until: int = 0,
    ):
        super().__init__(
            model,
            n_way,
            inner_lr=inner_lr,
            inner_loss=inner_loss,
            adaptation_steps=adaptation_steps,
            eval_adaptation_steps=eval_adaptation_steps,
            first_order=first_order,
            task_batching=task_batching,
            task_chunk=task_chunk,
            inner_params="head",
            msl_steps=msl_steps,
            lslr=lslr,
            first_order_until=first_order_until,
        )
