"""Matching Networks for One Shot Learning (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, 2016).

P(y_hat = n | x_hat, S) = sum_{i: y_i = n} a(x_hat, x_i)                (attention over the support set S)
a(x_hat, x_i) = softmax_i(c(f(x_hat), g(x_i)))                          (c: cosine similarity)
loss = -log P(y_hat = true class | x_hat, S), in log space: logsumexp over the class's support items of the
       attention logits minus logsumexp over all of them; `adapt` returns these log P as logits.

Without full-context embeddings (FCE), f = g = the backbone embedding. With FCE (the paper's appendix):
g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i), a bidirectional LSTM over the support embeddings g' plus a skip;
f(x_hat, S) = h_K of an attention LSTM run for K (`fce_steps`) steps on the query embedding f'(x_hat).
Both LSTMs are D wide for D-sized embeddings, 28 D^2 + 24 D parameters: the flattened map of a wide
backbone makes them impractical (ResNet-12 at 84x84, D = 16000: 7.2 billion), and they are refused
above MAX_FCE_PARAMETERS.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import EpisodeClassifier, JointEmbedding, check_positive
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError

# Refusing rather than pooling the map before FCE: pooling would make f' and g' differ between fce=true
# and fce=false (an FCE ablation would change two things), and it is not the paper's model on its own
# mini-ImageNet Conv4, whose flattened 64x5x5 = 1600 features need 72M parameters. The limit lets those
# through and refuses maps an order of magnitude wider (ResNet-12 at 32x32, D = 2560: 184M; at 84x84: 7.2B).
MAX_FCE_PARAMETERS = 100_000_000


def fce_parameters(dim: int) -> int:
    """Parameters of FullContextEmbedding(dim): the bidirectional LSTM(D, D), 2 x (4D x 2D + 8D), and
    the LSTMCell(2D, D), 4D x 3D + 8D."""
    return 28 * dim**2 + 24 * dim


def cosine_similarity(query_emb: Tensor, support_emb: Tensor, eps: float = 1e-8) -> Tensor:
    """Pairwise cosine similarities `[..., M, D], [..., S, D] -> [..., M, S]`."""
    query_unit = F.normalize(query_emb, dim=-1, eps=eps)
    support_unit = F.normalize(support_emb, dim=-1, eps=eps)
    return query_unit @ support_unit.transpose(-1, -2)


def class_log_probs(attention_logits: Tensor, support_y: Tensor, n_way: int) -> Tensor:
    """log P(y_hat = n) = log sum_{i: y_i = n} softmax_i(logits): `[T, M, S], [T, S] -> [T, M, N]`.

    Summing probabilities and taking the log would underflow for confident attention; the logsumexp
    over each class's support items minus the logsumexp over all of them does not. Every class needs
    at least one support item (a class with none gets -inf).
    """
    # At least float32: bf16 logits from autocast would round the class log-probabilities coarsely.
    logits = attention_logits.to(torch.promote_types(attention_logits.dtype, torch.float32))
    in_class = F.one_hot(support_y, n_way).transpose(1, 2).bool()  # [T, N, S]
    masked = logits.unsqueeze(2).masked_fill(~in_class.unsqueeze(1), -math.inf)  # [T, M, N, S]
    return masked.logsumexp(dim=-1) - logits.logsumexp(dim=-1, keepdim=True)  # [T, M, N]


class FullContextEmbedding(nn.Module):
    """The paper's full-context embeddings g(x_i, S) and f(x_hat, S), for `dim`-sized embeddings.

    Attention LSTM, step k = 1..K, from h_0 = f'(x_hat) (h_hat_0 = 0), c_0 = 0:
        r_{k-1} = sum_i softmax_i(h_{k-1} . g(x_i)) g(x_i)
        h_hat_k, c_k = LSTM(f'(x_hat), [h_{k-1}, r_{k-1}], c_{k-1});   h_k = h_hat_k + f'(x_hat)
    The paper concatenates [h_{k-1}, r_{k-1}] as the hidden state. An LSTM's gates see
    W [input; hidden] + b, so feeding [f'(x_hat), r_{k-1}] as the input and h_{k-1} as the hidden
    state (`nn.LSTMCell(2D, D)`) is the same function up to the order of the weight columns, and
    keeps a standard cell (the hidden state it returns is D, as h_hat_k must be). Feeding h + r as
    the hidden state, as some re-implementations do, ties the weights on h and r: a restriction of
    the paper's model, which this code does not make.
    """

    def __init__(self, dim: int, fce_steps: int):
        super().__init__()
        self.fce_steps = fce_steps
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_lstm = nn.LSTMCell(2 * dim, dim)

    def embed_support(self, support_emb: Tensor) -> Tensor:
        """g(x_i, S) `[T, S, D] -> [T, S, D]`: the support set is read in the order it is given."""
        support_emb = support_emb.to(self.support_lstm.weight_ih_l0.dtype)  # autocast hands us bf16
        with full_precision(support_emb):
            both, _ = self.support_lstm(
                support_emb
            )  # [T, S, 2D]: forward and backward hidden states
        forward, backward = both.chunk(2, dim=-1)
        return forward + backward + support_emb

    def embed_query(self, query_emb: Tensor, support_g: Tensor) -> Tensor:
        """f(x_hat, S) `[T, M, D], [T, S, D] -> [T, M, D]`; each query is processed on its own."""
        query_emb = query_emb.to(self.query_lstm.weight_ih.dtype)
        support_g = support_g.to(query_emb.dtype)
        n_tasks, n_query, dim = query_emb.shape
        f = query_emb.reshape(
            n_tasks * n_query, dim
        )  # [T*M, D]: every query of every task in one batch
        h, c = f, torch.zeros_like(f)
        for _ in range(self.fce_steps):
            attention = (h.view(n_tasks, n_query, dim) @ support_g.transpose(1, 2)).softmax(
                dim=-1
            )  # [T, M, S]
            readout = (attention @ support_g).reshape(n_tasks * n_query, dim)  # [T*M, D]
            with full_precision(f):
                h_hat, c = self.query_lstm(torch.cat([f, readout], dim=-1), (h, c))
            h = h_hat + f
        return h.view(n_tasks, n_query, dim)


def full_precision(x: Tensor) -> torch.autocast:
    """Autocast off for the LSTMs, so they run in their weights' float32 under device.amp=bf16|fp16:
    oneDNN has no bf16 LSTM on CPUs without AVX-512 (it fails to build one), and the two LSTMs are a
    small share of an episode's cost next to the backbone, which autocast still runs in bf16/fp16."""
    return torch.autocast(x.device.type, enabled=False)


class MatchingNet(JointEmbedding, EpisodeClassifier):
    """Matching Networks; `model` must embed `[T, B, C, H, W] -> [T, B, D]` per task (Conv4 does).

    fce: full-context embeddings (bidirectional LSTM over the support set, attention LSTM over each
        query), sized from `model.out_features` (refused where that makes them over MAX_FCE_PARAMETERS);
        off by default, as in the paper's Omniglot runs.
    fce_steps: K, the attention LSTM's processing steps (the paper does not state its value).
    cosine_scale: a factor on the cosine similarity before the attention softmax. 1.0, the default,
        is the paper's model: cosines lie in [-1, 1], so 5-way 1-shot attention can put at most
        e/(e + 4/e) = 0.65 on the nearest support item; a larger scale sharpens it and learns faster
        (Omniglot 5w1s, 100 steps of 2 tasks: 67% test accuracy with the plain cosine, 84% with a
        scale learned from 10).
    learn_scale: learn the scale (from `cosine_scale`, kept positive as exp of a parameter).
    Support and query are embedded in one backbone call, so batch-norm statistics are the
    episode's, as in ProtoNet. `n_way` is taken from each task batch: any number of ways works.
    """

    default_head = "attention"

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        fce: bool = False,
        fce_steps: int = 5,
        cosine_scale: float = 1.0,
        learn_scale: bool = False,
    ):
        if fce and fce_steps < 1:
            raise MetarunError(
                f"algorithm.fce_steps={fce_steps} must be at least 1 with algorithm.fce=true; "
                f"set algorithm.fce_steps=1 or more"
            )
        check_positive(
            "cosine_scale",
            cosine_scale,
            "set algorithm.cosine_scale=1.0 (the paper's plain cosine) or larger",
        )
        super().__init__(model, n_way)
        if fce:
            dim = getattr(model, "out_features", None)
            if not isinstance(dim, int):
                raise MetarunError(
                    f"algorithm.fce=true sizes its LSTMs from model.out_features, which "
                    f"{type(model).__name__} does not have; use a backbone of metarun.models (they declare "
                    f"it: conv4, resnet12, resnet18) or set algorithm.fce=false"
                )
            if fce_parameters(dim) > MAX_FCE_PARAMETERS:
                shape = "x".join(map(str, getattr(model, "out_shape", ()))) or str(dim)
                raise MetarunError(
                    f"algorithm.fce=true sizes its LSTMs from model.out_features={dim} ({type(model).__name__}'s "
                    f"{shape} map): {fce_parameters(dim) / 1e6:,.0f}M parameters, over the "
                    f"{MAX_FCE_PARAMETERS // 1_000_000}M limit; use a backbone with fewer features (model=conv4: "
                    f"1600 at 84x84, 64 at 28x28) or set algorithm.fce=false"
                )
            self.full_context = FullContextEmbedding(dim, fce_steps)
        else:
            self.full_context = None
        # A fixed scale stays a Python float, exact in any dtype; a learned one is exp(log_scale) > 0.
        self.cosine_scale = cosine_scale
        self.log_scale = nn.Parameter(torch.tensor(math.log(cosine_scale))) if learn_scale else None

    def embed_episode(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> tuple[Tensor, Tensor]:
        """g(x_i, S) and f(x_hat, S): the backbone's embeddings, support and queries in one call
        (the episode's batch-norm statistics), through the full-context LSTMs with `fce`."""
        support_emb, query_emb = super().embed_episode(support_x, support_y, query_x, n_way)
        if self.full_context is not None:
            support_emb = self.full_context.embed_support(support_emb)  # g(x_i, S)
            query_emb = self.full_context.embed_query(query_emb, support_emb)  # f(x_hat, S)
        return support_emb, query_emb

    def episode_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> Tensor:
        """log P(y_hat | x_hat, S) `[T, N*Q, N]`, whose softmax is the paper's P."""
        support_emb, query_emb = self.embed_episode(support_x, support_y, query_x, n_way)
        scale = self.cosine_scale if self.log_scale is None else self.log_scale.exp()
        attention_logits = scale * cosine_similarity(query_emb, support_emb)  # [T, N*Q, N*K]
        return class_log_probs(attention_logits, support_y, n_way)

    def forward(
        self, tasks: TaskBatch, diagnostics: bool = False, loss_scale: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss, metrics = super().forward(tasks, diagnostics)
        if diagnostics and self.log_scale is not None:
            metrics["cosine_scale"] = self.log_scale.detach().exp()
        return loss, metrics

    def query_losses(self, logits: Tensor, query_y: Tensor, reduction: str = "none") -> Tensor:
        """As EpisodeClassifier's, but `episode_logits` are already class log-probabilities."""
        losses = F.nll_loss(logits.flatten(0, 1), query_y.flatten(), reduction=reduction)
        return losses.view_as(query_y) if reduction == "none" else losses
