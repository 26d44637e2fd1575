"""A Closer Look at Few-shot Classification (Chen, Liu, Kira, Wang & Huang, 2019): Baseline and Baseline++.

Training: backbone f and a classifier over all C training classes, by cross-entropy on ordinary batches:
  Baseline:    logits_c = w_c . f(x) + b_c                       Baseline++:  logits_c = s * cos(f(x), w_c)
Testing: f frozen; a NEW classifier of the same kind over the episode's N classes is fitted to the support
embeddings by SGD (lr 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3, batches of 4, 100 epochs) and
classifies the queries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import EpisodeClassifier, accuracy, check_at_least, check_positive
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError

# Seeds the fine-tuning's head initialization and mini-batch order: every evaluation of an episode
# fine-tunes from the same start in the same order, whatever else is in the batch.
FINETUNE_SEED = 0


def global_labels(labels: Tensor, classes: Tensor) -> Tensor:
    """Episode labels to training-class indices, `[T, M], [T, N] -> [T, M]`: label j of task t is classes[t, j]."""
    return classes.gather(1, labels)


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


class Baseline(EpisodeClassifier):
    """Baseline (`cosine=False`) and Baseline++ (`cosine=True`) over a backbone `model` (`[B, C, H, W] -> [B, D]`).

    Training: the trainer gives episodes; support and query images of all T tasks are flattened into one
    labelled batch, each label mapped to its training class through `TaskBatch.classes`, and classified
    over all `n_train_classes` (given by the trainer). So batches are drawn as episodes: N*T classes,
    classes without replacement within a task and K+Q images of each, which is close to, but not the same
    as, the paper's shuffled epochs over all training images (`episode.n_way=8 episode.k_shot=1
    episode.n_query=1 episode.meta_batch_size=1` is a batch of 16 images of 8 classes). The batch is
    embedded in one call, so batch norm uses the statistics of the whole batch, as in ordinary training.
    metrics["accuracy"] is the all-class classifier's accuracy on that batch.

    Evaluation (`evaluate`, `adapt`): each episode's support and query images are embedded by the frozen
    backbone in one call per task. With `model.batch_norm=running` (the experiment configs) batch norm
    uses the running statistics of training, so each image is embedded on its own and a query's
    prediction depends only on the support set and itself: the paper's protocol (its code extracts the
    test features in `model.eval()`, save_features.py). With `model.batch_norm=task` it uses the
    episode's statistics, support and queries together (transductive, as ProtoNet's default). A new
    head, linear or cosine with scale `finetune_scale`, is fitted to the support embeddings
    (`finetune_heads`) and classifies the queries. Any eval n_way works: the training head is not used
    at test time.

    scale: s of the training cosine classifier (Baseline++ only; the authors' code uses 10 for more than
        200 classes, as Omniglot's 4112, and 2 otherwise);
    finetune_scale: s of the new cosine head (Baseline++ only; 2 in the authors' code for N <= 200);
    finetune_epochs: passes over the support set; finetune_batch_size: support items per SGD step (the
        last batch of a pass is smaller when it does not divide N*K; a value >= N*K is full-batch gradient
        descent); finetune_lr, finetune_momentum, finetune_dampening, finetune_weight_decay: the SGD
        optimizer of the new head. Defaults are the paper's code (methods/baselinefinetune.py).

    The authors' code also gives each class vector of the cosine classifier a learnable norm
    (WeightNorm, their issue #4); this follows the paper's formula, a pure cosine times s.
    """

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        n_train_classes: int,
        cosine: bool = False,
        scale: float = 10.0,
        finetune_scale: float = 2.0,
        finetune_epochs: int = 100,
        finetune_lr: float = 0.01,
        finetune_batch_size: int = 4,
        finetune_momentum: float = 0.9,
        finetune_dampening: float = 0.9,
        finetune_weight_decay: float = 0.001,
    ):
        if n_train_classes < 1:
            raise MetarunError(
                f"n_train_classes={n_train_classes}: Baseline needs the training split's class count; "
                f"the trainer passes it, pass it yourself when building Baseline directly"
            )
        check_positive("scale", scale)
        check_positive("finetune_scale", finetune_scale)
        check_at_least(
            "finetune_epochs",
            finetune_epochs,
            1,
            "set algorithm.finetune_epochs=1 or more (paper: 100)",
        )
        check_positive("finetune_lr", finetune_lr)
        check_at_least(
            "finetune_batch_size",
            finetune_batch_size,
            1,
            "set algorithm.finetune_batch_size=1 or more (paper: 4)",
        )
        if not 0 <= finetune_momentum < 1:
            raise MetarunError(
                f"algorithm.finetune_momentum={finetune_momentum} must be in [0, 1); "
                f"set algorithm.finetune_momentum=0.9 (paper) or 0 for none"
            )
        if not 0 <= finetune_dampening <= 1:
            raise MetarunError(
                f"algorithm.finetune_dampening={finetune_dampening} must be in [0, 1]; "
                f"set algorithm.finetune_dampening=0.9 (paper) or 0 for none"
            )
        if finetune_weight_decay < 0:
            raise MetarunError(
                f"algorithm.finetune_weight_decay={finetune_weight_decay} must be >= 0; "
                f"set algorithm.finetune_weight_decay=0.001 (paper) or 0 for none"
            )
        super().__init__(model, n_way)
        self.n_train_classes = n_train_classes
        self.cosine = cosine
        self.scale = scale
        self.finetune_scale = finetune_scale
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self.finetune_batch_size = finetune_batch_size
        self.finetune_momentum = finetune_momentum
        self.finetune_dampening = finetune_dampening
        self.finetune_weight_decay = finetune_weight_decay
        # The classifier over all training classes; the cosine one has no bias. Zero bias as in the
        # authors' code.
        self.head = nn.Linear(model.out_features, n_train_classes, bias=not cosine)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    def forward(
        self, tasks: TaskBatch, diagnostics: bool = False, loss_scale: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if tasks.classes is None:
            raise MetarunError(
                "Baseline trains on the classes behind each episode label but the task batch has no classes; "
                "build the TaskBatch with classes [T, N] (EpisodeSampler does)"
            )
        x = torch.cat([tasks.support_x, tasks.query_x], dim=1).flatten(
            0, 1
        )  # [T*(N*K + N*Q), C, H, W]
        y = torch.cat(
            [
                global_labels(tasks.support_y, tasks.classes),
                global_labels(tasks.query_y, tasks.classes),
            ],
            dim=1,
        ).flatten()  # [T*(N*K + N*Q)]
        logits = classifier_logits(
            self.model(x), self.head.weight, self.head.bias, self.cosine, self.scale
        )  # [B, C]
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "accuracy": accuracy(logits, y)}

    def episode_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> Tensor:
        """Query logits `[T, N*Q, N]` of heads fine-tuned on the support sets, backbone frozen."""
        n_support = support_x.shape[1]
        with torch.no_grad():  # the backbone is frozen: no graph, no gradient reaches it
            emb = self.model(torch.cat([support_x, query_x], dim=1))  # [T, N*K + N*Q, D]
        emb = emb.to(torch.promote_types(emb.dtype, torch.float32))
        support_emb, query_emb = emb[:, :n_support], emb[:, n_support:]
        weight, bias = finetune_heads(
            support_emb,
            support_y,
            n_way,
            cosine=self.cosine,
            scale=self.finetune_scale,
            epochs=self.finetune_epochs,
            lr=self.finetune_lr,
            batch_size=self.finetune_batch_size,
            momentum=self.finetune_momentum,
            dampening=self.finetune_dampening,
            weight_decay=self.finetune_weight_decay,
        )
        with torch.no_grad(), torch.autocast(emb.device.type, enabled=False):
            return classifier_logits(
                query_emb, weight, bias, self.cosine, self.finetune_scale
            )  # [T, N*Q, N]
