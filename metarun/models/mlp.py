"""A multilayer perceptron backbone: MAML's sinusoid network (Finn et al., 2017, section 5.1).

`hidden` fully connected ReLU layers (MAML: two of 40 units) on inputs of `in_features` numbers;
the head (metarun.models.layers.Classifier, one output for regression) follows. No batch norm.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from metarun.errors import MetarunError
from metarun.models.layers import Backbone


class MLP(Backbone):
    """`[B, in_features] -> [B, hidden[-1]]` and `[T, B, in_features] -> [T, B, hidden[-1]]`."""

    batch_norm = "none"

    def __init__(self, in_features: int = 1, hidden: list[int] | None = None):
        super().__init__()
        hidden = list((40, 40) if hidden is None else hidden)  # also an OmegaConf ListConfig
        if not hidden or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden
        ):
            raise MetarunError(
                f"model.hidden={hidden} must be a list of positive layer widths; "
                "set model.hidden=[40,40] (MAML's sinusoid network)"
            )
        widths = [in_features] + hidden
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.in_features = in_features
        self.finish((in_features,))

    def features(self, h: Tensor, n_tasks: int) -> Tensor:
        for layer in self.layers:
            h = F.relu(layer(h))
        return h
