"""UNICORN-MAML (Ye & Chao, "How to train your MAML to excel in few-shot classification", 2022).

MAML whose linear head is one meta-learned vector w (and bias b) copied to each of the N ways
before the inner loop:

W_0 = [w; w; ...; w]  (N rows),  b_0 = [b, ..., b];  then MAML's inner loop adapts (W, b) and the body.

Every way starts from the same row, so the adapted model, and its predictions, do not depend on
which class the episode sampler numbered 0 (plain MAML's initial head gives each label position its
own row, so permuting the ways changes what it predicts). The meta-gradient of w is the sum of the N
copies' gradients (autograd through the copy). One vector serves every N: a run trained on 5-way
tasks also tests on 20-way ones.
"""

from __future__ import annotations

import inspect

from torch import Tensor, nn

from metarun.algorithms.maml import MAML

HEAD_WEIGHT, HEAD_BIAS = "head.weight", "head.bias"


def copied_head(params: dict[str, Tensor], n_way: int) -> dict[str, Tensor]:
    """`params` with the head's single row (`[1, D]` weight, `[1]` bias) copied to `n_way` rows."""
    wide = dict(params)
    wide[HEAD_WEIGHT] = params[HEAD_WEIGHT].expand(n_way, -1)
    wide[HEAD_BIAS] = params[HEAD_BIAS].expand(n_way)
    return wide


class UnicornMAML(MAML):
    """MAML over `Classifier(model, 1)`: the one head row is copied to the episode's N ways before
    adaptation (`copied_head`); MAML's options and inner loop otherwise (see `MAML`)."""

    fixed_for_n_way = None
    regression = False

    def __init__(self, model: nn.Module, n_way: int, **maml):
        super().__init__(model, 1, **maml)
        self.n_way = n_way  # the training episodes' N; any other N is classified too

    # MAML's keys, as Hydra's config offers them (metarun.config.accepted_arguments reads this).
    __init__.__signature__ = inspect.signature(MAML.__init__)

    def starting_params(self, params: dict[str, Tensor], n_way: int) -> dict[str, Tensor]:
        return copied_head(params, n_way)
