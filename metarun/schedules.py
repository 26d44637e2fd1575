"""Learning-rate schedules that torch builds from two of its own: a linear warm-up, then cosine
decay (P>M>F: Hu et al., 2022). The trainer steps them once per step, or once per epoch when
train.epochs is set."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from metarun.errors import MetarunError


def warmup_cosine(
    optimizer: Optimizer,
    warmup: int,
    total: int,
    start_factor: float = 0.01,
    eta_min: float = 0.0,
) -> SequentialLR:
    """lr * start_factor rising linearly to lr over `warmup` units, then cosine decay to eta_min
    at `total`."""
    if not 0 <= warmup < total:
        raise MetarunError(
            f"scheduler.warmup={warmup} must be at least 0 and below scheduler.total={total}; "
            "warm up for fewer units than the run has"
        )
    if not 0 < start_factor <= 1:
        raise MetarunError(
            f"scheduler.start_factor={start_factor} must be in (0, 1]; set e.g. 0.01"
        )
    rise = LinearLR(optimizer, start_factor, 1.0, total_iters=max(warmup, 1))
    decay = CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=eta_min)
    return SequentialLR(optimizer, [rise, decay], milestones=[warmup])
