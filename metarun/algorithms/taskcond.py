"""TADAM: Task dependent adaptive metric for improved few-shot learning (Oreshkin, Rodriguez & Lacoste, 2018).

t = 1/N sum_n [mean_k f(x_nk), std_k f(x_nk)]               (task representation, unconditioned backbone f,
                                                              its map averaged over height and width)
gamma_l = 1 + gamma0_l * h_l(t),  beta_l = beta0_l * g_l(t)   (TEN h_l, g_l; scalar post-multipliers, 0 at init)
f_t: BN_l -> gamma_l * BN_l + beta_l;  p(y=n|x) = softmax_n(-alpha ||f_t(x) - c_n||^2),  c_n = mean_k f_t(x_nk)
loss = cross-entropy + film_l2 * sum_l (gamma0_l^2 + beta0_l^2) / 2

What is TADAM's and what is not:
- FiLM after batch norm is folded into batch norm's affine parameters, gamma * (w * x_hat + b) + beta =
  (gamma * w) * x_hat + (gamma * b + beta), and the backbone is called with them through
  `torch.func.functional_call`: the backbone itself is unchanged. Every `TaskBatchNorm` of the backbone
  is conditioned (Conv4: the batch norm of each of its blocks; TADAM conditions each conv of ResNet-12).
- TEN (as TADAM's code and appendix): per conditioned batch norm, two residual MLPs (one for gamma,
  one for beta) of `ten_layers` linear layers; the first maps t to the block's C channels, the others
  are C -> C with a skip connection; ReLU between layers (TADAM used swish-1, its backbone's activation);
  weights N(0, 0.2 / C) as TADAM's initializer (factor 0.1, fan-out), biases 0.
- The post-multipliers gamma0, beta0 start at 0, so at initialization the conditioned network is the
  plain one (and the TEN's own gradients are exactly zero until they move). Their penalty follows
  TADAM's TensorFlow `l2_regularizer` (weight * sum w^2 / 2), so film_l2 = 0.01 is TADAM's value as used.
- Task representation: TADAM uses the mean of the class prototypes of its features after global average
  pooling; here too f is the backbone's map averaged over height and width, C numbers an item for a
  backbone that declares `out_shape` (C, H, W): 640 for ResNet-12 at 84x84, not its flattened
  640x5x5 = 16000 (which made the TEN 310M parameters); Conv4's 1x1 map at 28x28 is its own average.
  The metric's prototypes stay the flattened map's, as ProtoNet's. The mean class spread
  (standard deviation over a class's K support embeddings) is appended, so t has 2C entries. The spread
  is the population one (divided by K): exactly 0 for 1-shot, through a square root whose gradient at
  0 is 0 (not NaN). In 1-shot training the spread inputs thus carry nothing and their TEN weights get
  no gradient; they stay at initialization and only act if the learner is later evaluated with K > 1.
- Metric: squared Euclidean distance (ProtoNet's) times a learned scale alpha (TADAM section 2.1).
  TADAM's code uses the unsquared distance with a fixed alpha cross-validated per dataset;
  `learn_metric_scale=false` fixes alpha at `metric_scale_init`.
- TADAM's auxiliary co-training (a 64-way classification head trained alongside, sampled with an
  annealed probability) is not implemented.
- Batch norm: the unconditioned pass embeds each task's support set alone (its own statistics, as
  TADAM's task-encoding pass); the conditioned pass embeds support and query of a task in one call,
  so the statistics are the episode's (as ProtoNet here).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metarun.algorithms.base import (
    EpisodeClassifier,
    JointEmbedding,
    check_at_least,
    check_positive,
)
from metarun.algorithms.protonet import prototypes, squared_euclidean
from metarun.algorithms.task_batching import check_task_batching, map_tasks
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError
from metarun.models.layers import TaskBatchNorm


def task_representation(support_emb: Tensor, support_y: Tensor, n_way: int) -> Tensor:
    """Mean over classes of [class mean, class spread]: `[T, N*K, D], [T, N*K] -> [T, 2D]`.

    The spread is the population standard deviation over the class's support embeddings (0 for K=1).
    Permuting the support items (with their labels) leaves it unchanged.
    """
    means = prototypes(support_emb, support_y, n_way)  # [T, N, D]
    # Deviations from the own class mean, not E[x^2] - E[x]^2, which cancels badly in low precision.
    deviations = support_emb - means.gather(
        1, support_y.unsqueeze(-1).expand_as(support_emb)
    )  # [T, N*K, D]
    variances = prototypes(deviations.square(), support_y, n_way)  # [T, N, D]
    spreads = safe_sqrt(variances)  # [T, N, D]
    return torch.cat([means.mean(dim=1), spreads.mean(dim=1)], dim=-1)  # [T, 2D]


def channel_means(emb: Tensor, channels: int) -> Tensor:
    """Global average pooling of flattened feature maps: `[..., C*H*W] -> [..., C]`, the mean over the
    H*W positions of each channel (flattening is channel-major). A 1x1 map comes back unchanged."""
    return emb.unflatten(-1, (channels, -1)).mean(dim=-1)


def safe_sqrt(x: Tensor) -> Tensor:
    """sqrt(x) for x >= 0 whose gradient at x = 0 is 0 rather than inf * 0 = NaN (1-shot spreads)."""
    positive = x > 0
    return torch.where(
        positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x)
    )


def film_batch_norm_affine(
    weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor
) -> tuple[Tensor, Tensor]:
    """Batch-norm affine parameters that apply FiLM after the batch norm: `[C], [C], [T, C], [T, C] -> [T, C] x 2`.

    gamma * (weight * x_hat + bias) + beta = (gamma * weight) * x_hat + (gamma * bias + beta).
    """
    return gamma * weight, gamma * bias + beta


def film_penalty(gamma0: Tensor, beta0: Tensor, film_l2: float) -> Tensor:
    """film_l2 * sum(gamma0^2 + beta0^2) / 2 (TensorFlow's l2_regularizer, as in TADAM's code)."""
    return film_l2 * (gamma0.square().sum() + beta0.square().sum()) / 2


class ResidualMLP(nn.Module):
    """`layers` linear layers `in_features -> width -> ... -> width`, ReLU between them, a skip
    connection around every layer after the first (TADAM's TEN branch)."""

    def __init__(self, in_features: int, width: int, layers: int):
        super().__init__()
        self.linears = nn.ModuleList(
            nn.Linear(in_features if i == 0 else width, width) for i in range(layers)
        )
        for linear in self.linears:
            # TADAM's ScaledVarianceRandomNormal(factor=0.1): variance 0.1 * 2 / fan-out.
            nn.init.normal_(linear.weight, std=math.sqrt(0.2 / width))
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        for i, linear in enumerate(self.linears):
            x = linear(x) if i == 0 else x + linear(x)
            if i < len(self.linears) - 1:
                x = F.relu(x)
        return x


class TaskCond(JointEmbedding, EpisodeClassifier):
    """TADAM's task-conditioned backbone (FiLM from a task embedding network) with a scaled metric.

    film_l2: weight of the L2 penalty on the post-multipliers gamma0, beta0 (TADAM: 0.01);
    metric_scale_init: alpha at initialization (1 = ProtoNet's logits at initialization);
    learn_metric_scale: alpha is trained (true) or fixed at metric_scale_init (TADAM's experiments);
    ten_layers: linear layers per TEN branch (TADAM: 3);
    task_batching: how the conditioned backbone runs over tasks, each with its own FiLM parameters:
        "loop" one task after another, "vmap" with `torch.func.vmap`, "auto" loop on the CPU and vmap
        on CUDA (as MAML's choice; the CPU's Conv4 loops over tasks in any case).
    """

    default_head = "centroid"

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        film_l2: float = 0.01,
        metric_scale_init: float = 1.0,
        learn_metric_scale: bool = True,
        ten_layers: int = 3,
        task_batching: str = "auto",
    ):
        check_at_least("film_l2", film_l2, 0, "set algorithm.film_l2=0.01 (TADAM's)")
        check_positive(
            "metric_scale_init", metric_scale_init, "set algorithm.metric_scale_init=1.0"
        )
        check_at_least("ten_layers", ten_layers, 1, "set algorithm.ten_layers=3 (TADAM's)")
        super().__init__(model, n_way)
        # The batch norms to condition, by the names functional_call knows them under.
        self.film_names = [
            name for name, module in model.named_modules() if isinstance(module, TaskBatchNorm)
        ]
        if not self.film_names:
            raise MetarunError(
                f"algorithm=taskcond conditions the backbone's batch norms (TaskBatchNorm), but "
                f"{type(model).__name__} has none; use a backbone built from metarun.models.layers (model=conv4, "
                f"resnet12 or resnet18)"
            )
        if not hasattr(model, "out_features"):
            raise MetarunError(
                f"algorithm=taskcond needs model.out_features on {type(model).__name__}; use a backbone that "
                f"declares it (model=conv4, resnet12 or resnet18)"
            )
        channels = [model.get_submodule(name).weight.numel() for name in self.film_names]
        # Pooled over height and width where the backbone says what its map is (every metarun backbone);
        # the flattened embedding otherwise.
        out_shape = getattr(model, "out_shape", None)
        self.task_features = out_shape[0] if out_shape else model.out_features
        task_dim = 2 * self.task_features
        self.ten_gamma = nn.ModuleList(ResidualMLP(task_dim, c, ten_layers) for c in channels)
        self.ten_beta = nn.ModuleList(ResidualMLP(task_dim, c, ten_layers) for c in channels)
        self.gamma0 = nn.Parameter(
            torch.zeros(len(channels))
        )  # post-multipliers, one per conditioned layer
        self.beta0 = nn.Parameter(torch.zeros(len(channels)))
        self.metric_scale = nn.Parameter(
            torch.tensor(float(metric_scale_init)), requires_grad=learn_metric_scale
        )
        self.film_l2 = film_l2
        self.task_batching = check_task_batching(task_batching, model)

    # -- the model ---------------------------------------------------------------------------------
    def task_embedding(self, support_x: Tensor, support_y: Tensor, n_way: int) -> Tensor:
        """t from the unconditioned backbone's channel means: `[T, N*K, C, H, W] -> [T, 2C]`."""
        support_emb = channel_means(self.model(support_x), self.task_features)  # [T, N*K, C]
        return task_representation(support_emb, support_y, n_way)  # [T, 2C]

    def film_params(self, support_x: Tensor, support_y: Tensor, n_way: int) -> dict[str, Tensor]:
        """Per-task batch-norm affine parameters with FiLM folded in: `{name.weight|bias: [T, C]}`."""
        task = self.task_embedding(support_x, support_y, n_way)  # [T, 2C]
        params = {}
        for i, name in enumerate(self.film_names):
            norm = self.model.get_submodule(name)
            gamma = 1 + self.gamma0[i] * self.ten_gamma[i](task)  # [T, C]
            beta = self.beta0[i] * self.ten_beta[i](task)  # [T, C]
            weight, bias = film_batch_norm_affine(
                norm.weight, norm.bias, gamma, beta
            )  # [T, C] each
            params[f"{name}.weight"], params[f"{name}.bias"] = weight, bias
        return params

    def conditioned_embedding(self, film: dict[str, Tensor], x: Tensor) -> Tensor:
        """The backbone with task t's batch-norm parameters on task t's items: `[T, B, C, H, W] -> [T, B, D]`.

        The parameters not in `film` are the backbone's own (functional_call leaves them in place)."""
        return map_tasks(
            lambda p, xt: functional_call(self.model, p, (xt,)), self.task_batching, film, x
        )

    def embed_episode(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> tuple[Tensor, Tensor]:
        """The task-conditioned embeddings, support and queries in one call (`embed`, for the
        base-class statistics, is the unconditioned backbone's: they have no task to condition on)."""
        film = self.film_params(support_x, support_y, n_way)
        n_support = support_x.shape[1]
        emb = self.conditioned_embedding(
            film, torch.cat([support_x, query_x], dim=1)
        )  # [T, N*K + N*Q, D]
        return emb[:, :n_support], emb[:, n_support:]

    def episode_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> Tensor:
        """Query logits `[T, N*Q, N]`: -alpha * squared distance to the conditioned prototypes."""
        film = self.film_params(support_x, support_y, n_way)
        return self.conditioned_logits(film, support_x, support_y, query_x, n_way)

    def conditioned_logits(
        self,
        film: dict[str, Tensor],
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        n_way: int,
    ) -> Tensor:
        n_support = support_x.shape[1]
        emb = self.conditioned_embedding(
            film, torch.cat([support_x, query_x], dim=1)
        )  # [T, N*K + N*Q, D]
        support_emb, query_emb = emb[:, :n_support], emb[:, n_support:]
        return -self.metric_scale * squared_euclidean(
            query_emb, prototypes(support_emb, support_y, n_way)
        )

    # -- the contract ------------------------------------------------------------------------------
    def forward(
        self, tasks: TaskBatch, diagnostics: bool = False, loss_scale: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean query cross-entropy plus the post-multipliers' L2 penalty; `diagnostics` adds alpha,
        the mean |gamma0| and |beta0| (how far the conditioning has moved from the plain network) and
        the penalty."""
        query_loss, metrics = super().forward(tasks, diagnostics)
        penalty = film_penalty(self.gamma0, self.beta0, self.film_l2)
        loss = query_loss + penalty
        metrics["loss"] = loss.detach()
        if diagnostics:
            metrics["metric_scale"] = self.metric_scale.detach().clone()
            metrics["film_gamma0"] = self.gamma0.detach().abs().mean()
            metrics["film_beta0"] = self.beta0.detach().abs().mean()
            metrics["film_penalty"] = penalty.detach()
        return loss, metrics

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """The task's FiLM parameters are computed once; each prediction embeds the support set with
        the queries, as in training, so batch-norm statistics include the support set."""
        n_way = int(support_y.max()) + 1
        film = {
            k: v.detach()
            for k, v in self.film_params(support_x[None], support_y[None], n_way).items()
        }

        def predict(query_x: Tensor) -> Tensor:
            return self.conditioned_logits(
                film, support_x[None], support_y[None], query_x[None], n_way
            )[0]  # [M, N]

        return predict
