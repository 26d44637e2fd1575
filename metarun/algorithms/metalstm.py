"""Optimization as a Model for Few-Shot Learning (Ravi & Larochelle, 2017).

theta_t = c_t = f_t * c_{t-1} + i_t * c~_t,  c~_t = -grad_t       (the learner's parameters are the cell state)
f_t = sigmoid(W_F [h_t, theta_{t-1}, f_{t-1}] + b_F),  i_t = sigmoid(W_I [h_t, theta_{t-1}, i_{t-1}] + b_I)
h_t = LSTM([pre(grad_t), pre(L_t)], h_{t-1})    (pre: the preprocessing of Andrychowicz et al., 2016, p = 10)
c_0 is learned; the meta-loss is the query loss at theta_T; grad_t and L_t enter as constants.

Every coordinate of the learner's parameters has its own LSTM state, and all coordinates share
the meta-learner's weights: one LSTM call per step processes all of them as rows (every task's
together, or one task at a time: see `MetaLSTM.adapt_tasks`).
The learner is `Classifier(model, n_way)` (the backbone and a linear head fixed at n_way) run with
`torch.func.functional_call`; its own nn.Parameters are c_0. As in the paper, the learner's
gradient and loss are computed at a detached theta_{t-1}, so the meta-gradient flows through the
gates, the cell state and c_0, never through second derivatives of the learner.

Choices where the paper leaves room (the authors' code is github.com/twitter-research/meta-learning-lstm):
- Each update uses one mini-batch of `support_batch_size` support items, cycling through the
  (shuffled) support set; 0 uses the whole support set every update. The authors' code runs a
  number of epochs over batches of 5; for 5-way 1-shot both are 15 full-support updates.
- The previous gates enter the gates as values (the paper's f_{t-1}, i_{t-1}; the code feeds back
  pre-activations); f_0 = i_0 = 0 as in the code. b_F and b_I start at fixed values (the code
  draws U(4, 5) and U(-5, -4)); every other meta-learner weight starts in U(-0.01, 0.01) as there.
- Batch norm normalizes with the statistics of the batch at hand: each support mini-batch while
  adapting, the query set when predicting (Conv4 keeps no running statistics); the code uses
  batch statistics while adapting and running statistics at test time.
- The meta-learner runs in the parameters' dtype even under autocast: its cell state is the
  learner's weights, which bf16 gates (8 bits of mantissa) would blur at every step.
- The authors' code clips the meta-gradient norm at 0.25: `train.grad_clip=0.25` (the experiment config).
Memory grows with tasks x adaptation_steps x learner parameters x hidden_size (the LSTM's
activations for every coordinate at every step), so keep `episode.meta_batch_size` small (the
paper: 1) and the learner small (the paper: 32 filters).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metarun.algorithms.base import MetaLearner, accuracy, check_at_least
from metarun.algorithms.task_batching import (
    check_task_batching,
    check_task_chunk,
    chunk_tasks,
    map_tasks,
    resolve_task_batching,
)
from metarun.data.tasks import TaskBatch
from metarun.models.layers import Classifier, no_statistics_update

PREPROCESS_P = 10.0
INIT_RANGE = 0.01  # meta-learner weights start in U(-0.01, 0.01), as in the authors' code


def preprocess(x: Tensor, p: float = PREPROCESS_P) -> Tensor:
    """Andrychowicz et al. (2016): `x [...] -> [..., 2]`, (log|x| / p, sign x) if |x| >= e^-p, else (-1, e^p x).

    Gradients and losses span orders of magnitude; this brings them to order one while keeping
    both their scale and their sign.
    """
    threshold = math.exp(-p)
    large = x.abs() >= threshold
    # clamp_min keeps log() finite where the other branch is taken
    log_part = torch.where(large, x.abs().clamp_min(threshold).log() / p, torch.full_like(x, -1.0))
    sign_part = torch.where(large, x.sign(), x * math.exp(p))
    return torch.stack([log_part, sign_part], dim=-1)


def lstm_cell(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor,
    bias_hh: Tensor,
) -> tuple[Tensor, Tensor]:
    """A standard LSTM step with `nn.LSTMCell`'s weights and numbers: `x [R, I]`, `h, c [R, H]` -> h, c `[R, H]`.

    The gates are laid out `[4, R, H]` so that each activation runs over contiguous memory
    (`nn.LSTMCell`'s gate chunks are strided): one CPU thread, R = 28k rows, H = 20, it ran 2-3x
    faster forward and 1.6x faster forward and backward, and a Conv4-32 training step 1.7x faster.
    """
    R, H = h.shape
    W_ih = weight_ih.view(4, H, -1).transpose(1, 2)  # [4, I, H]
    W_hh = weight_hh.view(4, H, H).transpose(1, 2)  # [4, H, H]
    gates = (
        torch.baddbmm((bias_ih + bias_hh).view(4, 1, H), h.expand(4, R, H), W_hh) + x @ W_ih
    )  # [4, R, H]
    i, f = torch.sigmoid(gates[:2])  # gate order of nn.LSTMCell: input, forget, cell, output
    g, o = torch.tanh(gates[2]), torch.sigmoid(gates[3])
    c = f * c + i * g
    return o * torch.tanh(c), c


def meta_lstm_gates(
    h: Tensor,
    theta_prev: Tensor,
    f_prev: Tensor,
    i_prev: Tensor,
    W_F: Tensor,
    b_F: Tensor,
    W_I: Tensor,
    b_I: Tensor,
) -> tuple[Tensor, Tensor]:
    """Forget and input gates of every coordinate: `h [..., H]`, `theta_prev, f_prev, i_prev [...]` -> f, i `[...]`.

    W_F, W_I `[H + 2]` weigh [h_t, theta_{t-1}, gate_{t-1}]; b_F, b_I are scalars.
    """
    H = h.shape[-1]
    f = torch.sigmoid(h @ W_F[:H] + theta_prev * W_F[H] + f_prev * W_F[H + 1] + b_F)
    i = torch.sigmoid(h @ W_I[:H] + theta_prev * W_I[H] + i_prev * W_I[H + 1] + b_I)
    return f, i


def meta_lstm_update(theta_prev: Tensor, grad: Tensor, f: Tensor, i: Tensor) -> Tensor:
    """The cell-state update c_t = f_t * c_{t-1} + i_t * c~_t with c~_t = -grad_t (f = 1, i = alpha: SGD)."""
    return f * theta_prev - i * grad


class MetaLearnerLSTM(nn.Module):
    """The two-layer coordinate-wise meta-learner: a standard LSTM (hidden_size) over each coordinate's
    preprocessed (gradient, loss), then the gated cell-state update. Its state per coordinate is
    ((h, c) of the first layer, f_{t-1}, i_{t-1})."""

    def __init__(self, hidden_size: int, forget_bias_init: float, input_bias_init: float):
        super().__init__()
        # The first layer's weights, run by lstm_cell; input: pre(grad) (2) and pre(loss) (2).
        self.lstm = nn.LSTMCell(4, hidden_size)
        self.W_F = nn.Parameter(torch.empty(hidden_size + 2))
        self.W_I = nn.Parameter(torch.empty(hidden_size + 2))
        with torch.no_grad():
            for weight in [*self.lstm.parameters(), self.W_F, self.W_I]:
                weight.uniform_(-INIT_RANGE, INIT_RANGE)
        # A forget gate near 1 and a small input gate: training starts as gradient descent with a
        # small learning rate (sigmoid(-4.5) = 0.011).
        self.b_F = nn.Parameter(torch.tensor(float(forget_bias_init)))
        self.b_I = nn.Parameter(torch.tensor(float(input_bias_init)))

    def forward(
        self, theta: Tensor, grad: Tensor, loss: Tensor, state: tuple | None = None
    ) -> tuple[Tensor, tuple]:
        """One update of every coordinate of every task: `theta, grad [T, P]`, `loss [T]` -> theta_t `[T, P]`, state."""
        T, P = theta.shape
        x = torch.cat(
            [preprocess(grad), preprocess(loss)[:, None].expand(T, P, 2)], dim=-1
        )  # [T, P, 4]
        if state is None:
            h = c = theta.new_zeros(T * P, self.lstm.hidden_size)
            f_prev = i_prev = torch.zeros_like(theta)
        else:
            (h, c), f_prev, i_prev = state
        lstm = self.lstm
        h, c = lstm_cell(
            x.reshape(T * P, 4), h, c, lstm.weight_ih, lstm.weight_hh, lstm.bias_ih, lstm.bias_hh
        )
        f, i = meta_lstm_gates(
            h.view(T, P, -1), theta, f_prev, i_prev, self.W_F, self.b_F, self.W_I, self.b_I
        )
        return meta_lstm_update(theta, grad, f, i), ((h, c), f, i)


class MetaLSTM(MetaLearner):
    """Meta-learner LSTM over `Classifier(model, n_way)`, whose parameters are the learned c_0.

    hidden_size: the first (standard) LSTM layer's hidden size (the authors' code: 20);
    adaptation_steps: learner updates on the support set in meta-training (each one LSTM step);
    eval_adaptation_steps: updates for `evaluate` and `adapt`;
    support_batch_size: support items per update, cycling through the support set (0: all of them);
    forget_bias_init, input_bias_init: starting b_F and b_I (forget gate near 1, input gate small);
    task_batching: "vmap" adapts all tasks together (the learner's gradients and query losses
        mapped over the tasks with `torch.func.vmap`, one meta-learner call per step for all their
        coordinates), "loop" adapts the tasks one after another, "auto" is vmap on CUDA and a loop on
        the CPU (as for MAML; see `adapt_tasks`).
    task_chunk: tasks per backward pass in training, as MAML's ("auto": 1 in a loop, all under vmap).
    `forward`'s loss_scale (an fp16 GradScaler's) scales the learner's support loss.
    """

    backbone_prefix = "model.backbone"

    fixed_for_n_way = "head"

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        hidden_size: int = 20,
        adaptation_steps: int = 15,
        eval_adaptation_steps: int = 15,
        support_batch_size: int = 0,
        forget_bias_init: float = 4.5,
        input_bias_init: float = -4.5,
        task_batching: str = "auto",
        task_chunk: int | str = "auto",
    ):
        for key, value in [
            ("hidden_size", hidden_size),
            ("adaptation_steps", adaptation_steps),
            ("eval_adaptation_steps", eval_adaptation_steps),
        ]:
            check_at_least(key, value, 1)
        check_at_least(
            "support_batch_size",
            support_batch_size,
            0,
            "set algorithm.support_batch_size=0 (the whole support set) or a batch size",
        )
        super().__init__(Classifier(model, n_way), n_way)
        self.meta_learner = MetaLearnerLSTM(hidden_size, forget_bias_init, input_bias_init)
        self.adaptation_steps = adaptation_steps
        self.eval_adaptation_steps = eval_adaptation_steps
        self.support_batch_size = support_batch_size
        self.task_batching = check_task_batching(task_batching, model)
        self.task_chunk = check_task_chunk(task_chunk)

    # -- the learner's parameters as one flat cell state ---------------------------------------
    def initial_cell_state(self) -> Tensor:
        """c_0: the classifier's parameters, flattened: `[P]`."""
        return torch.cat([p.reshape(-1) for p in self.model.parameters()])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """One task's flat parameters `[P]` -> the classifier's named parameters (views of theta)."""
        named = list(self.model.named_parameters())
        pieces = theta.split([p.numel() for _, p in named])
        return {name: piece.view(p.shape) for (name, p), piece in zip(named, pieces)}

    # -- the learner ----------------------------------------------------------------------------
    def use_vmap(self, x: Tensor) -> bool:
        return resolve_task_batching(self.task_batching, x.device) == "vmap"

    def support_gradients(
        self, theta: Tensor, support_x: Tensor, support_y: Tensor, loss_scale: float = 1.0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The learner's support gradient, loss and accuracy at `theta [T, P]` (taken as a constant):
        `support_x [T, B, C, H, W]`, `support_y [T, B]` -> grad `[T, P]`, loss `[T]`, accuracy `[T]`, all detached."""

        def scaled_loss(flat: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            logits = functional_call(self.model, self.unflatten(flat), (x,))  # [B, N]
            loss = F.cross_entropy(logits, y)
            return loss * loss_scale, (loss.detach(), accuracy(logits, y))

        # The learner needs its gradient also where the caller evaluates under torch.no_grad().
        with torch.enable_grad():
            grads, (losses, accs) = map_tasks(
                torch.func.grad(scaled_loss, has_aux=True),
                self.task_batching,
                theta.detach(),
                support_x,
                support_y,
            )
        if loss_scale != 1.0:
            grads = grads / loss_scale
        return grads, losses, accs

    def query_losses(
        self, theta: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per-task loss and accuracy of the learner with parameters `theta [T, P]` (differentiable):
        `query_x [T, M, C, H, W]`, `query_y [T, M]` -> `[T]`, `[T]`."""

        def one_task(flat: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            logits = functional_call(self.model, self.unflatten(flat), (x,))  # [M, N]
            return F.cross_entropy(logits, y), accuracy(logits, y)

        return map_tasks(one_task, self.task_batching, theta, query_x, query_y)

    def support_batch(self, step: int, n_support: int) -> slice:
        """The support items of update `step`: consecutive mini-batches, cycling (items are shuffled)."""
        size = self.support_batch_size or n_support
        start = step % math.ceil(n_support / size) * size
        return slice(start, start + size)

    # -- the meta-learner -----------------------------------------------------------------------
    def adapt_tasks(
        self,
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        record: bool = False,
        loss_scale: float = 1.0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """theta_T `[T, P]` for each task after `steps` meta-learner updates on its support set
        (`support_x [T, N*K, C, H, W]`, `support_y [T, N*K]`), differentiable with respect to c_0
        and the meta-learner. With `record`, per task `[T]`: support accuracy before adapting (on
        the first update's mini-batch) and the forget and input gates' means over steps and coordinates.

        With "loop" task batching the tasks adapt one after another: on the CPU one task's LSTM
        activations (P x hidden_size per tensor) stay in cache, where all tasks' together do not
        (Conv4-32, one thread: 0.29 s per evaluation episode one by one, 0.43 s ten at a time).
        """
        if self.use_vmap(support_x) or len(support_y) == 1:
            return self.adapt_together(support_x, support_y, steps, record, loss_scale)
        per_task = [
            self.adapt_together(x[None], y[None], steps, record, loss_scale)
            for x, y in zip(support_x, support_y)
        ]
        theta = torch.cat([theta for theta, _ in per_task])
        stats = {
            key: torch.cat([task_stats[key] for _, task_stats in per_task])
            for key in per_task[0][1]
        }
        return theta, stats

    def adapt_together(
        self,
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        record: bool = False,
        loss_scale: float = 1.0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`adapt_tasks` for all tasks at once: one meta-learner call per step for every coordinate of every task."""
        n_tasks, n_support = support_y.shape
        theta = self.initial_cell_state().expand(n_tasks, -1)  # [T, P]: every task starts at c_0
        state, stats, gates = None, {}, []
        for step in range(steps):
            batch = self.support_batch(step, n_support)
            grad, loss, acc = self.support_gradients(
                theta, support_x[:, batch], support_y[:, batch], loss_scale
            )
            if record and step == 0:
                stats["support_acc_before"] = acc
            with torch.autocast(theta.device.type, enabled=False):
                theta, state = self.meta_learner(theta, grad, loss, state)
            if record:
                gates.append(
                    torch.stack([gate.detach().mean(dim=1) for gate in state[1:]])
                )  # [2, T]
        if record:
            stats["forget_gate"], stats["input_gate"] = torch.stack(gates).mean(dim=0)  # [T] each
        return theta, stats

    def forward(
        self, tasks: TaskBatch, diagnostics: bool = False, loss_scale: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Meta-training loss; `diagnostics` adds support accuracy before and after adapting (one
        more support forward pass per task) and the mean forget and input gates."""
        self.check_n_way(tasks.n_way)
        theta, stats = self.adapt_tasks(
            tasks.support_x, tasks.support_y, self.adaptation_steps, diagnostics, loss_scale
        )
        losses, accs = self.query_losses(theta, tasks.query_x, tasks.query_y)
        loss = losses.mean()
        metrics = {"loss": loss.detach(), "accuracy": accs.mean()}
        if diagnostics:
            with (
                torch.no_grad(),
                no_statistics_update(self.model),
            ):  # a metric: the running statistics stay
                support_acc_after = self.query_losses(
                    theta.detach(), tasks.support_x, tasks.support_y
                )[1]
            metrics.update({key: value.mean() for key, value in stats.items()})
            metrics["support_acc_after"] = support_acc_after.mean()
        return loss, metrics

    def task_chunks(self, tasks: TaskBatch) -> list[TaskBatch]:
        return chunk_tasks(tasks, self.task_chunk, self.task_batching)

    def evaluate(self, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
        self.check_n_way(tasks.n_way)
        with torch.no_grad():
            theta, _ = self.adapt_tasks(
                tasks.support_x, tasks.support_y, self.eval_adaptation_steps
            )
            return self.query_losses(theta, tasks.query_x, tasks.query_y)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        with torch.no_grad():
            theta, _ = self.adapt_tasks(
                support_x[None], support_y[None], self.eval_adaptation_steps
            )
        params = self.unflatten(theta[0])

        def predict(query_x: Tensor) -> Tensor:
            return functional_call(self.model, params, (query_x,))  # [M, n_way]

        return predict
