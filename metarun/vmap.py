"""Telling whether code runs under `torch.func.vmap`, where some PyTorch kernels must be avoided."""

from __future__ import annotations

import torch
from torch import Tensor


def is_vmapped(x: Tensor) -> bool:
    """Whether `x` is batched by `torch.func.vmap` at any level of functorch wrapping (under
    `vmap(grad(f))` the batched tensor hides inside a gradient-tracking wrapper)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(x):
        if functorch.is_batchedtensor(x):
            return True
        x = functorch.get_unwrapped(x)
    return False


def is_transformed(x: Tensor) -> bool:
    """Whether `x` is inside a `torch.func` transform (grad, vmap, ...), where buffers cannot be
    updated in place."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x)
