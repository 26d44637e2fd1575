"""Stopping a run whose numbers diverged: a loss or gradient norm that is NaN or infinite.

The run stops with one line naming the step, the values and what usually fixes it, before that
step is logged or saved, so `last.pt` and `best.pt` keep the last finite weights.

Watching costs no device sync on the hot path. Each step's loss and gradient norm (the fused
norm clip_grad_norm_ returns, or the same `torch._foreach_norm` without clipping: one kernel per
device and dtype, where `error_if_nonfinite` would sync every step) are stacked on the device;
`check` reads all the steps since the last check in one transfer. The trainer checks on the steps
that sync anyway (logging, validation, checkpoints) and on every step where a sync costs nothing:
on the CPU, and under fp16, whose GradScaler reads its found-inf flag every step. So a diverged
CUDA run goes on for at most train.log_every steps whose weights are never logged or saved, and
the line names the first non-finite step all the same.

fp16's GradScaler skips a step whose gradient overflowed and halves its scale: that is how it finds
its scale, not divergence. Under fp16 only FP16_PATIENCE non-finite steps in a row stop the run.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from omegaconf import DictConfig, OmegaConf

from metarun.errors import RunFailed

# Non-finite fp16 steps in a row that stop a run: the scaler has halved its scale 20 times by then,
# from 2**16 to 2**-4, and a gradient that still overflows is not a scaling problem.
FP16_PATIENCE = 20


class Diverged(RunFailed):
    """The loss, the gradient, the weights or a validation score became NaN or infinite."""


class NonFiniteSteps:
    """Watches each step's loss and gradient norm; `patience` non-finite steps in a row diverge."""

    def __init__(self, patience: int = 1):
        self.patience = patience
        self.pending: list[
            tuple[int, torch.Tensor]
        ] = []  # steps not read yet: (step, [loss, grad norm])
        self.in_a_row = 0
        self.first: tuple[int, float, float] | None = (
            None  # (step, loss, grad norm) opening the current run
        )

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Record a step's values on their device: no sync."""
        self.pending.append(
            (step, torch.stack([loss.detach().float(), grad_norm.detach().float()]))
        )

    def check(self) -> tuple[int, float, float, int] | None:
        """(first step, its loss, its gradient norm, steps in a row) of a run of `patience`
        non-finite steps among those observed so far, or None. One device-to-host transfer."""
        if not self.pending:
            return None
        steps = [step for step, _ in self.pending]
        values = torch.stack([value for _, value in self.pending]).cpu().tolist()
        self.pending = []
        for step, (loss, grad_norm) in zip(steps, values):
            if math.isfinite(loss) and math.isfinite(grad_norm):
                self.in_a_row, self.first = 0, None
                continue
            self.in_a_row += 1
            self.first = self.first or (step, loss, grad_norm)
            if self.in_a_row >= self.patience:
                return (*self.first, self.in_a_row)
        return None


def gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients, on their device (no sync)."""
    params = list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    return torch.linalg.vector_norm(
        torch.stack([norm.float() for norm in torch._foreach_norm(grads)])
    )


def nonfinite_entries(state: dict[str, Any]) -> list[str]:
    """The names of a state dict's floating-point tensors that hold a NaN or an infinity (one sync)."""
    floats = {name: t for name, t in state.items() if torch.is_tensor(t) and t.is_floating_point()}
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(t).all() for t in floats.values()]).cpu().tolist()
    return [name for name, ok in zip(floats, finite) if not ok]


def remedies(cfg: DictConfig, lr: float | None = None) -> str:
    """What usually brings a diverging run back: a lower learning rate, clipping, another AMP mode.
    `lr`: the learning rate at the failing step, named when a scheduler moved it from optimizer.lr."""
    rates = [
        f"{key} (now {value:g})"
        for key in ("optimizer.lr", "algorithm.inner_lr")
        if isinstance(value := OmegaConf.select(cfg, key), (int, float))
        and not isinstance(value, bool)
    ]
    if rates and lr is not None and lr != OmegaConf.select(cfg, "optimizer.lr"):
        rates[0] = rates[0][:-1] + f", {lr:g} at this step)"
    fixes = [f"lower {' or '.join(rates)}" if rates else "lower the learning rate"]
    clip = cfg.train.grad_clip
    fixes.append(
        "set train.grad_clip (e.g. 1.0)"
        if clip is None
        else f"lower train.grad_clip (now {clip:g})"
    )
    amp = getattr(cfg.device.amp, "value", cfg.device.amp)
    if amp != "none":
        fixes.append("use device.amp=bf16 or none" if amp == "fp16" else "use device.amp=none")
    return ", ".join(fixes[:-1]) + " or " + fixes[-1]


def describe_step(found: tuple[int, float, float, int], fp16: bool) -> str:
    """'step 12: loss nan, gradient norm inf' (fp16: '... 20 steps in a row from step 12 ...')."""
    step, loss, grad_norm, in_a_row = found
    values = f"loss {loss:g}, gradient norm {grad_norm:g}"
    if fp16 and in_a_row > 1:
        return f"{in_a_row} non-finite steps in a row from step {step} ({values}), fp16's scaler skipped them all"
    return f"step {step}: {values}"
