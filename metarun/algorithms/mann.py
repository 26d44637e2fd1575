"""Meta-Learning with Memory-Augmented Neural Networks (Santoro, Bartunov, Botvinick, Wierstra & Lillicrap, 2016).

An LSTM controller reads (x_t, y_{t-1}) and writes to an external memory M by least-recently-used access (LRUA):
w^r_t = softmax_i K(k_t, M_t(i)) (cosine K),  r_t = sum_i w^r_t(i) M_t(i),  w^u_t = gamma w^u_{t-1} + w^r_t + w^w_t,
w^w_t = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1},  M_t(i) = M_{t-1}(i) + w^w_t(i) k_t
(the least-used slot zeroed first); the class logits come from [h_t, r_t].

Adapted to metarun's episodes: the images go through the backbone `model` (Conv4) first, not raw
pixels into the controller, since every algorithm here shares the backbone. The support set is the
sequence; each query is then one more step from the state after the last support item, so every
query sees the whole labelled support set and no other query; a query step reads without writing
(LRUAController). One departure from the paper: the cosines are scaled by `key_strength` (the NTM's
key strength beta) before the read softmax; key_strength=1 is the paper's formula, which did not
leave chance level in a CPU-sized run (MANN's docstring).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaLearner, accuracy, check_at_least, check_positive
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError

# Inside the norms of the cosine similarity: keeps the similarity and its gradient finite for the
# all-zero rows of a fresh (or just zeroed) memory; 5e-7 relative error for rows of norm 1.
COSINE_EPS = 1e-6
# Evaluation presents the support set in one fixed order, drawn once from this seed (and shared by
# every task, so a task's result does not depend on its position in the batch).
EVAL_ORDER_SEED = 0


# -- LRUA, pure functions over any leading batch dims ---------------------------------------------
def cosine_similarity(keys: Tensor, memory: Tensor, eps: float = COSINE_EPS) -> Tensor:
    """K(k, M(i)) = k . M(i) / (|k| |M(i)|): `[..., H, W], [..., slots, W] -> [..., H, slots]`."""
    dots = keys @ memory.transpose(-1, -2)  # [..., H, slots]
    key_norms = keys.square().sum(-1).add(eps).sqrt()  # [..., H]
    slot_norms = memory.square().sum(-1).add(eps).sqrt()  # [..., slots]
    return dots / (key_norms.unsqueeze(-1) * slot_norms.unsqueeze(-2))


def least_used_weights(usage: Tensor, n: int) -> Tensor:
    """One-hot rows on the n least-used slots, least used first: `[..., slots] -> [..., n, slots]`.

    Together the rows are the paper's w^lu (1 where usage is among the n smallest). A stable sort
    sends ties (a fresh memory) to the lower slot index, so the choice is deterministic.
    """
    order = torch.argsort(usage.detach(), dim=-1, stable=True)[..., :n]  # [..., n]
    return F.one_hot(order, usage.shape[-1]).to(usage.dtype)


def lrua_write(
    memory: Tensor, keys: Tensor, write_gates: Tensor, prev_read_weights: Tensor, prev_usage: Tensor
) -> tuple[Tensor, Tensor]:
    """The LRUA write of H heads: `(M_t [..., slots, W], w^w_t [..., H, slots])`.

    memory M_{t-1} `[..., slots, W]`, keys k_t `[..., H, W]`, write_gates alpha `[..., H]`,
    prev_read_weights w^r_{t-1} `[..., H, slots]`, prev_usage w^u_{t-1} `[..., slots]`.
    Head h interpolates between its own last read and the h-th least-used slot, so the heads'
    least-used parts add up to the paper's w^lu (the paper does not say which head writes where;
    this is tristandeleu/ntm-one-shot's reading); only the least-used slot is zeroed before the write.
    """
    least_used = least_used_weights(prev_usage, keys.shape[-2])  # [..., H, slots]
    gate = torch.sigmoid(write_gates).unsqueeze(-1)  # [..., H, 1]
    write_weights = gate * prev_read_weights + (1 - gate) * least_used  # [..., H, slots]
    kept = 1 - least_used[..., 0, :]  # [..., slots]: 0 on the least-used slot
    memory = memory * kept.unsqueeze(-1) + write_weights.transpose(-1, -2) @ keys  # [..., slots, W]
    return memory, write_weights


def lrua_read(memory: Tensor, keys: Tensor, key_strength: float = 1.0) -> tuple[Tensor, Tensor]:
    """Content-based read `(w^r_t [..., H, slots], r_t [..., H, W])` of `memory [..., slots, W]`:
    w^r_t = softmax_i(key_strength * K(k_t, M(i))); key_strength 1 is the paper's formula."""
    read_weights = torch.softmax(
        key_strength * cosine_similarity(keys, memory), dim=-1
    )  # [..., H, slots]
    return read_weights, read_weights @ memory.to(read_weights.dtype)  # [..., H, W]


def update_usage(
    usage: Tensor, read_weights: Tensor, write_weights: Tensor, gamma: float
) -> Tensor:
    """w^u_t = gamma w^u_{t-1} + sum_heads (w^r_t + w^w_t): `[..., slots]`."""
    return gamma * usage + read_weights.sum(-2) + write_weights.sum(-2)


def previous_labels(labels: Tensor, n_way: int, dtype: torch.dtype) -> Tensor:
    """The label input of each step, one-hot of the previous item's label and zero at the first
    step: `[T, S] -> [T, S, N]` (step t sees y_{t-1})."""
    one_hot = F.one_hot(labels, n_way).to(dtype)  # [T, S, N]
    return F.pad(one_hot[:, :-1], (0, 0, 1, 0))


def controller_embedding(emb: Tensor) -> Tensor:
    """Each embedding centred and scaled to unit length (a layer norm without affine, / sqrt(D)):
    `[..., D] -> [..., D]`.

    Conv4's post-ReLU features share a large positive part (cosine 0.74 between different Omniglot
    characters at initialization, 0.21 once centred) and have norm ~9 against 1 for the one-hot
    label beside them in the controller input; on real 5-way 1-shot episodes (4 per step, Adam
    1e-3) the query accuracy was at chance after 600 steps without this and 0.31 with it.
    """
    return F.layer_norm(emb, emb.shape[-1:]) / emb.shape[-1] ** 0.5


# -- the memory-augmented controller -------------------------------------------------------------
class MemoryState(NamedTuple):
    """What one step hands to the next; any leading batch dims (tasks, or tasks x queries)."""

    h: Tensor  # [..., controller_size]
    c: Tensor  # [..., controller_size]
    memory: Tensor  # [..., memory_slots, memory_size]
    read_vectors: Tensor  # [..., read_heads, memory_size]   r_{t-1}
    read_weights: Tensor  # [..., read_heads, memory_slots]  w^r_{t-1}
    usage: Tensor  # [..., memory_slots]                     w^u_{t-1}


class LRUAController(nn.Module):
    """LSTM controller with an LRUA memory; one `forward` is one time step.

    The controller's input is [x_t, r_{t-1}] (the last reads feed the next state, as in the paper);
    its hidden state gives each head a key k_t (tanh, so repeated writes to a slot stay bounded) and
    a write gate alpha_t. A step writes, then reads the memory it wrote (M_t), as in the paper: so
    w^r_{t-1} points at the slot that holds k_{t-1}, and a gate near 1 writes the next step's key,
    which carries y_{t-1}, into the same slot. A query step (`write=False`) reads without writing:
    its write would reach no later step, and reading after it every query would find its own key
    (cosine 1) ahead of the support items. The output features are
    [h_t, r_t] `[..., controller_size + read_heads * memory_size]`.
    """

    def __init__(
        self,
        input_size: int,
        controller_size: int,
        memory_slots: int,
        memory_size: int,
        read_heads: int,
        gamma: float,
        key_strength: float,
    ):
        super().__init__()
        self.memory_slots, self.memory_size, self.read_heads = memory_slots, memory_size, read_heads
        self.gamma, self.key_strength = gamma, key_strength
        self.controller = nn.LSTMCell(input_size + read_heads * memory_size, controller_size)
        self.keys = nn.Linear(controller_size, read_heads * memory_size)
        self.write_gates = nn.Linear(controller_size, read_heads)
        self.out_features = controller_size + read_heads * memory_size

    def initial_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> MemoryState:
        """Empty memory, zero usage and reads: the first write goes to slot 0, the least used."""
        zeros = lambda *shape: torch.zeros(batch, *shape, device=device, dtype=dtype)
        h = self.controller.hidden_size
        slots, width, heads = self.memory_slots, self.memory_size, self.read_heads
        return MemoryState(
            zeros(h),
            zeros(h),
            zeros(slots, width),
            zeros(heads, width),
            zeros(heads, slots),
            zeros(slots),
        )

    def forward(
        self, x: Tensor, state: MemoryState, write: bool = True
    ) -> tuple[Tensor, MemoryState | None]:
        """One step for `x [..., input_size]`: `(features, next state)`, or `(features, None)` with
        `write=False` (the query step, whose writes nothing reads). The state's leading dims
        broadcast against x's: the query step passes a state `[T, 1, ...]` with x `[T, Q, ...]`."""
        lead = x.shape[:-1]
        reads = state.read_vectors.flatten(-2).expand(*lead, -1)  # [..., H*W]
        hidden = self.controller.hidden_size
        h, c = self.controller(
            torch.cat([x, reads.to(x.dtype)], dim=-1).reshape(-1, self.controller.input_size),
            (
                state.h.expand(*lead, -1).reshape(-1, hidden),
                state.c.expand(*lead, -1).reshape(-1, hidden),
            ),
        )
        h, c = h.view(*lead, hidden), c.view(*lead, hidden)
        keys = torch.tanh(self.keys(h)).unflatten(
            -1, (self.read_heads, self.memory_size)
        )  # [..., H, W]
        if not write:
            _, read_vectors = lrua_read(state.memory, keys, self.key_strength)
            return torch.cat([h, read_vectors.flatten(-2).to(h.dtype)], dim=-1), None
        memory, write_weights = lrua_write(
            state.memory, keys, self.write_gates(h), state.read_weights, state.usage
        )
        read_weights, read_vectors = lrua_read(memory, keys, self.key_strength)
        usage = update_usage(state.usage, read_weights, write_weights, self.gamma)
        features = torch.cat([h, read_vectors.flatten(-2).to(h.dtype)], dim=-1)
        return features, MemoryState(h, c, memory, read_vectors, read_weights, usage)


class MANN(MetaLearner):
    """Memory-augmented neural network with LRUA over the backbone's embeddings.

    Support and query images are embedded in one backbone call, so Conv4's batch-norm statistics
    are the episode's (as in ProtoNet); they are the only thing queries share. The support items
    are presented in a random order in training (global torch RNG) and in one fixed order in
    `evaluate`/`adapt`. All tasks run side by side: the one Python loop is over support steps.

    controller_size: LSTM hidden units (paper: 200); memory_slots x memory_size: the memory
    (paper: 128 x 40); read_heads (paper: 4), each with its own key and write gate; gamma: usage
    decay (paper: 0.95); key_strength: multiplies the cosine similarities before the read softmax
    (paper: 1; with 1 the reads over 128 mostly empty slots are nearly uniform: on a synthetic
    5-way 1-shot task, 64-d Gaussian classes, Adam 1e-3, 16 tasks per step, query accuracy was
    0.22 after 600 steps with 1 and 0.86 after 400 with 10);
    score_support: also score the support steps' predictions (the paper
    scores every step of its sequence), averaging the loss over support and query predictions;
    off by default, so the loss is the query cross-entropy alone.
    The label input and the output layer are sized for `n_way`: `check_n_way` refuses other tasks.
    """

    fixed_for_n_way = "label input and output layer"

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        controller_size: int = 200,
        memory_slots: int = 128,
        memory_size: int = 40,
        read_heads: int = 4,
        gamma: float = 0.95,
        key_strength: float = 10.0,
        score_support: bool = False,
    ):
        for key, value in (
            ("controller_size", controller_size),
            ("memory_slots", memory_slots),
            ("memory_size", memory_size),
            ("read_heads", read_heads),
        ):
            check_at_least(key, value, 1)
        if read_heads > memory_slots:
            raise MetarunError(
                f"algorithm.read_heads={read_heads} exceeds algorithm.memory_slots={memory_slots} (each head writes "
                f"to its own least-used slot); set algorithm.read_heads<={memory_slots} or raise algorithm.memory_slots"
            )
        if not 0.0 <= gamma <= 1.0:
            raise MetarunError(
                f"algorithm.gamma={gamma} must be in [0, 1] (usage decay); the paper uses algorithm.gamma=0.95"
            )
        check_positive(
            "key_strength", key_strength, "set algorithm.key_strength=1 (the paper) or more"
        )
        super().__init__(model, n_way)
        self.score_support = score_support
        self.memory = LRUAController(
            model.out_features + n_way,
            controller_size,
            memory_slots,
            memory_size,
            read_heads,
            gamma,
            key_strength,
        )
        self.output = nn.Linear(self.memory.out_features, n_way)

    def presentation_order(self, n_tasks: int, n_support: int, device: torch.device) -> Tensor:
        """`[T, S]` indices into the support set: random per task in training, fixed in eval mode."""
        if self.training:
            return torch.rand(n_tasks, n_support, device=device).argsort(dim=1)
        generator = torch.Generator().manual_seed(EVAL_ORDER_SEED)
        return torch.randperm(n_support, generator=generator).to(device).expand(n_tasks, -1)

    def episode_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`(support_logits [T, S, N], support labels in presentation order [T, S], query_logits [T, Q, N])`.

        Step t of the support sequence takes (embedding of item t, one-hot label of item t-1); each
        query takes one step from the state after the last support item, with that item's label.
        """
        n_tasks, n_support = support_y.shape
        emb = controller_embedding(
            self.model(torch.cat([support_x, query_x], dim=1))
        )  # [T, S + Q, D]
        support_emb, query_emb = emb[:, :n_support], emb[:, n_support:]
        order = self.presentation_order(n_tasks, n_support, support_y.device)  # [T, S]
        support_emb = support_emb.gather(
            1, order.unsqueeze(-1).expand(-1, -1, emb.shape[-1])
        )  # [T, S, D]
        labels = support_y.gather(1, order)  # [T, S]
        dtype = self.output.weight.dtype
        inputs = torch.cat(
            [support_emb, previous_labels(labels, self.n_way, support_emb.dtype)], dim=-1
        )  # [T, S, D+N]

        state = self.memory.initial_state(n_tasks, emb.device, dtype)
        support_features = []
        for t in range(n_support):
            features, state = self.memory(inputs[:, t], state)  # [T, F]
            support_features.append(features)

        last_label = F.one_hot(labels[:, -1], self.n_way).to(query_emb.dtype)  # [T, N]
        query_inputs = torch.cat(
            [query_emb, last_label.unsqueeze(1).expand(-1, query_emb.shape[1], -1)], dim=-1
        )
        query_state = MemoryState(
            *(s.unsqueeze(1) for s in state)
        )  # [T, 1, ...]: shared, not copied per query
        query_features, _ = self.memory(query_inputs, query_state, write=False)  # [T, Q, F]
        support_logits = self.output(torch.stack(support_features, dim=1))  # [T, S, N]
        return support_logits, labels, self.output(query_features)  # [T, Q, N]

    def task_losses(
        self, support_logits: Tensor, labels: Tensor, query_logits: Tensor, query_y: Tensor
    ) -> Tensor:
        """Per-task loss `[T]`: query cross-entropy, or with `score_support` the mean over every
        prediction of the episode (support steps and queries)."""
        losses = F.cross_entropy(query_logits.transpose(1, 2), query_y, reduction="none")  # [T, Q]
        if self.score_support:
            support_losses = F.cross_entropy(
                support_logits.transpose(1, 2), labels, reduction="none"
            )  # [T, S]
            losses = torch.cat([support_losses, losses], dim=1)
        return losses.mean(dim=1)

    def forward(
        self, tasks: TaskBatch, diagnostics: bool = False, loss_scale: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Meta-training loss; `diagnostics` adds the accuracy of the online support predictions
        (an item is predicted before its label arrives: only repeated classes can be right)."""
        self.check_n_way(tasks.n_way)
        support_logits, labels, query_logits = self.episode_logits(
            tasks.support_x, tasks.support_y, tasks.query_x
        )
        loss = self.task_losses(support_logits, labels, query_logits, tasks.query_y).mean()
        metrics = {"loss": loss.detach(), "accuracy": accuracy(query_logits, tasks.query_y).mean()}
        if diagnostics:
            metrics["support_accuracy"] = accuracy(support_logits, labels).mean()
        return loss, metrics

    def evaluate(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        self.check_n_way(tasks.n_way)
        support_logits, labels, query_logits = self.episode_logits(
            tasks.support_x, tasks.support_y, tasks.query_x
        )
        losses = F.cross_entropy(
            query_logits.transpose(1, 2), tasks.query_y, reduction="none"
        )  # [T, Q]
        return losses.mean(dim=1).detach(), accuracy(query_logits, tasks.query_y)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """A predictor for one task; each call runs the support sequence again together with the
        queries (one backbone call, as in training), in the fixed evaluation order when the
        learner is in eval mode."""
        self.check_n_way(int(support_y.max()) + 1)

        def predict(query_x: Tensor) -> Tensor:
            return self.episode_logits(support_x[None], support_y[None], query_x[None])[2][
                0
            ]  # [M, N]

        return predict
