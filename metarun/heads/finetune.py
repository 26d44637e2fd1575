"""Fine-tuning a new classifier on the support embeddings (Chen, Liu, Kira, Wang & Huang, 2019, "A
Closer Look at Few-shot Classification"), as Baseline and Baseline++ test: the backbone frozen, a new
N-way head fitted by SGD on the support set, then applied to the queries.

  linear (Baseline):    logits_n(q) = w_n . q + b_n          cosine (Baseline++):  logits_n(q) = s * cos(q, w_n)

SGD with lr 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3, batches of 4, 100 epochs: the
authors' code (methods/baselinefinetune.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.errors import MetarunError
from metarun.heads.base import Head, at_least_float32

# Seeds the fine-tuning's head initialization and mini-batch order: every evaluation of an episode
# fine-tunes from the same start in the same order, whatever else is in the batch.
FINETUNE_SEED = 0


def cosine_logits(x: Tensor, weight: Tensor, scale: float) -> Tensor:
    """s * cos(x_m, w_n): `[..., M, D], [..., N, D] -> [..., M, N]`."""
    return scale * F.normalize(x, dim=-1) @ F.normalize(weight, dim=-1).transpose(-1, -2)


def classifier_logits(
    x: Tensor, weight: Tensor, bias: Tensor | None, cosine: bool, scale: float
) -> Tensor:
    """Baseline++'s cosine classifier if `cosine`, else Baseline's linear one: `[..., M, D] -> [..., M, N]`
    with `weight [..., N, D]` and `bias [..., N]` (unused by the cosine classifier)."""
    if cosine:
        return cosine_logits(x, weight, scale)
    return x @ weight.transpose(-1, -2) + bias.unsqueeze(-2)


def init_head(n_way: int, features: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """nn.Linear's default initialization, U(-1/sqrt(D), 1/sqrt(D)) for weight `[N, D]` and bias `[N]`,
    drawn in float64 on the CPU so it is the same on every device and dtype."""
    bound = 1 / math.sqrt(features)
    weight = torch.empty(n_way, features, dtype=torch.float64).uniform_(
        -bound, bound, generator=generator
    )
    bias = torch.empty(n_way, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
    return weight, bias


def minibatch_schedule(
    n_support: int, epochs: int, batch_size: int, generator: torch.Generator
) -> list[Tensor]:
    """Support indices for each SGD step: `epochs` shuffled passes, each cut into batches of
    `batch_size` (the last one smaller when it does not divide `n_support`), as in the paper's code."""
    steps = []
    for _ in range(epochs):
        order = torch.randperm(n_support, generator=generator)
        steps.extend(order.split(batch_size))
    return steps


def finetune_heads(
    support_emb: Tensor,  # [T, N*K, D], detached
    support_y: Tensor,  # [T, N*K]
    n_way: int,
    *,
    cosine: bool,
    scale: float,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float,
    dampening: float,
    weight_decay: float,
    seed: int = FINETUNE_SEED,
) -> tuple[Tensor, Tensor | None]:
    """Fit a new N-way head to each task's support embeddings; returns weight `[T, N, D]` and bias `[T, N]`
    (None for the cosine head), detached.

    All T heads are one batched parameter trained by one torch.optim.SGD. The loss is the sum over tasks
    of each task's mean cross-entropy on its mini-batch, so each head receives exactly the gradient it
    would receive alone; SGD's update (momentum, dampening, weight decay) is elementwise. Every task
    starts from the same initialization and sees its support items in the same order, both drawn from a
    local generator seeded by `seed`: no global RNG, the same result whichever tasks share the batch.
    """
    n_tasks, n_support, features = support_emb.shape
    generator = torch.Generator().manual_seed(seed)
    weight0, bias0 = init_head(n_way, features, generator)
    schedule = minibatch_schedule(n_support, epochs, batch_size, generator)
    # One copy to the device for all steps' indices.
    steps = torch.cat(schedule).to(support_emb.device).split([len(idx) for idx in schedule])
    like = dict(dtype=support_emb.dtype, device=support_emb.device)
    weight = weight0.to(**like).expand(n_tasks, -1, -1).clone().requires_grad_()  # [T, N, D]
    bias = (
        None if cosine else bias0.to(**like).expand(n_tasks, -1).clone().requires_grad_()
    )  # [T, N]
    params = [weight] if cosine else [weight, bias]
    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay
    )
    # The head is tiny: it trains in full precision even under autocast, and with gradients even when
    # the caller evaluates under torch.no_grad().
    with torch.enable_grad(), torch.autocast(support_emb.device.type, enabled=False):
        for idx in steps:
            logits = classifier_logits(
                support_emb[:, idx], weight, bias, cosine, scale
            )  # [T, b, N]
            losses = F.cross_entropy(
                logits.transpose(1, 2), support_y[:, idx], reduction="none"
            )  # [T, b]
            optimizer.zero_grad(set_to_none=True)
            losses.mean(dim=1).sum().backward()
            optimizer.step()
    return weight.detach(), None if bias is None else bias.detach()


class FinetuneHead(Head):
    """A new linear (`cosine=False`) or cosine head with scale `scale` per episode, fitted to the
    support embeddings by `finetune_heads` with the given SGD settings; every episode starts from
    the same initialization and mini-batch order (`seed`)."""

    def __init__(
        self,
        cosine: bool = False,
        scale: float = 2.0,
        epochs: int = 100,
        lr: float = 0.01,
        batch_size: int = 4,
        momentum: float = 0.9,
        dampening: float = 0.9,
        weight_decay: float = 0.001,
        seed: int = FINETUNE_SEED,
    ):
        check_finetune(scale, epochs, lr, batch_size, momentum, dampening, weight_decay)
        super().__init__()
        self.cosine, self.scale, self.seed = cosine, scale, seed
        self.sgd = dict(
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
        )

    def forward(self, support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
        support, query = at_least_float32(support.detach(), query.detach())
        weight, bias = finetune_heads(
            support,
            support_y,
            n_way,
            cosine=self.cosine,
            scale=self.scale,
            seed=self.seed,
            **self.sgd,
        )
        with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
            return classifier_logits(query, weight, bias, self.cosine, self.scale)  # [T, N*Q, N]


def check_finetune(
    scale: float,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float,
    dampening: float,
    weight_decay: float,
    prefix: str = "head.",
) -> None:
    """One line for a fine-tuning setting SGD cannot run with, naming the key as `prefix` does
    (Baseline's are `algorithm.finetune_*`)."""
    checks = (
        ("scale", scale > 0, "positive", "a value > 0 (the authors' code: 2)"),
        ("epochs", epochs >= 1, "at least 1", "1 or more (paper: 100)"),
        ("lr", lr > 0, "positive", "a value > 0 (paper: 0.01)"),
        ("batch_size", batch_size >= 1, "at least 1", "1 or more (paper: 4)"),
        ("momentum", 0 <= momentum < 1, "in [0, 1)", "0.9 (paper) or 0 for none"),
        ("dampening", 0 <= dampening <= 1, "in [0, 1]", "0.9 (paper) or 0 for none"),
        ("weight_decay", weight_decay >= 0, ">= 0", "0.001 (paper) or 0 for none"),
    )
    values = dict(
        scale=scale,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
    )
    for key, ok, rule, fix in checks:
        if not ok:
            name = f"{prefix}{key}"
            raise MetarunError(f"{name}={values[key]} must be {rule}; set {name}={fix}")
