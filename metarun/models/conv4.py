"""Conv-4 backbone (Vinyals et al., 2016; Finn et al., 2017).

`layers` blocks of [3x3 conv (padding 1), batch norm, ReLU, 2x2 max-pool]; the flattened feature
map is the embedding (64 features for 28x28 Omniglot: 28 -> 14 -> 7 -> 3 -> 1). `pool_layers`
blocks (the first ones) max-pool, all by default; Relation Networks (Sung et al., 2018) pool only
the first two, keeping a 64x7x7 map for 28x28 Omniglot (the paper's unpadded first two convs give
64x5x5). `out_shape` is that map's (channels, height, width); `out_features` its product.

Batch norm always uses the statistics of the current batch of each task and keeps no running
statistics:
  (a) MAML normalizes with each task's own batch statistics;
  (b) under `torch.func.vmap` PyTorch's training-mode batch norm gives a wrong second-order
      meta-gradient (relative error 1.5e-2 at one inner step in float64, see task_batch_norm);
      plain tensor ops are exact;
  (c) per-task statistics make evaluation independent of how many episodes are batched together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.errors import MetarunError
from metarun.vmap import is_vmapped


def task_batch_norm(x: Tensor, n_tasks: int, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalize `x [T*B, C, H, W]` per task and channel with the task's own batch statistics.

    PyTorch's fused kernel where it is exact; plain tensor operations under `torch.func.vmap`,
    where the fused kernel's second-order gradient is wrong (measured in float64 against the plain
    version: relative error 1.5e-2 at one inner step, 4.4e-2 at five; 1e-14 outside vmap).
    """
    if is_vmapped(x):
        return plain_task_batch_norm(x, n_tasks, weight, bias, eps)
    if n_tasks == 1:
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    # Tasks side by side as channels: [B, T*C, H, W], so one kernel call normalizes per task.
    xt = x.unflatten(0, (n_tasks, -1)).transpose(0, 1).flatten(1, 2)
    y = F.batch_norm(xt, None, None, weight.repeat(n_tasks), bias.repeat(n_tasks), training=True, eps=eps)
    return y.unflatten(1, (n_tasks, -1)).transpose(0, 1).flatten(0, 1)  # [T*B, C, H, W]


def plain_task_batch_norm(x: Tensor, n_tasks: int, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """task_batch_norm in plain mean/variance operations: exact to any order, also under vmap.

    y = (x - mean) / sqrt(var + eps) * weight + bias, mean and (biased) var over the B items and
    the H*W positions of one task. Statistics are taken in at least float32, so bf16/fp16 under
    autocast do not lose the variance; float64 stays float64.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xt = x.to(compute_dtype).unflatten(0, (n_tasks, -1))  # [T, B, C, H, W]
    var, mean = torch.var_mean(xt, dim=(1, 3, 4), correction=0, keepdim=True)  # [T, 1, C, 1, 1] each
    # Folded into one scale and shift per task and channel, so the full-size tensor is touched
    # by a single multiply-add (this layer dominates Conv4's time on a CPU).
    scale = torch.rsqrt(var + eps) * weight.view(1, 1, -1, 1, 1)  # [T, 1, C, 1, 1]
    shift = bias.view(1, 1, -1, 1, 1) - mean * scale  # [T, 1, C, 1, 1]
    y = torch.addcmul(shift, xt, scale)  # [T, B, C, H, W]
    return y.flatten(0, 1).to(x.dtype)  # [T*B, C, H, W]


class TaskBatchNorm(nn.Module):
    """Learnable affine batch norm over each task's own batch; no running statistics."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, n_tasks: int = 1) -> Tensor:
        return task_batch_norm(x, n_tasks, self.weight, self.bias, self.eps)


class ConvBlock(nn.Module):
    """3x3 conv -> per-task batch norm -> ReLU -> 2x2 max-pool (if `pool`)."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool = True):
        super().__init__()
        # No conv bias: the batch-norm mean subtraction cancels it (its gradient is exactly zero).
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm = TaskBatchNorm(out_channels)
        self.pool = pool

    def forward(self, x: Tensor, n_tasks: int = 1) -> Tensor:
        h = F.relu(self.norm(self.conv(x), n_tasks))
        return F.max_pool2d(h, 2) if self.pool else h


class Conv4(nn.Module):
    """Conv-4 embedding network; `out_shape` (channels, height, width of the feature map before
    flattening) and `out_features` are computed for square images of `image_size`."""

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        layers: int = 4,
        image_size: int = 28,
        pool_layers: int | None = None,
    ):
        super().__init__()
        if pool_layers is None:
            pool_layers = layers
        if isinstance(pool_layers, bool) or not isinstance(pool_layers, int) or not 0 <= pool_layers <= layers:
            raise MetarunError(
                f"model.pool_layers={pool_layers!r} must be an integer from 0 to model.layers={layers}; "
                f"set model.pool_layers=null to pool in every block"
            )
        size = image_size
        for _ in range(pool_layers):
            size //= 2
        if size < 1:
            raise MetarunError(
                f"model.layers={layers} pools a {image_size}x{image_size} image down to nothing; "
                f"lower model.layers (or model.pool_layers) or set model.image_size to the dataset's image size"
            )
        self.in_channels, self.image_size = in_channels, image_size
        self.pool_layers = pool_layers
        self.out_shape = (hidden, size, size)
        self.out_features = hidden * size * size
        channels = [in_channels] + [hidden] * layers
        self.blocks = nn.ModuleList(
            ConvBlock(c_in, c_out, pool=i < pool_layers)
            for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:]))
        )

    def forward(self, x: Tensor) -> Tensor:
        """`[B, C, H, W] -> [B, D]` (one task) or `[T, B, C, H, W] -> [T, B, D]` (per-task statistics)."""
        if x.dim() == 5 and x.device.type == "cpu":
            # One task at a time on the CPU: batching tasks needs the per-task batch norm's
            # transposes, which made ProtoNet 2.5x slower than a per-task loop (scripts/bench.py).
            return torch.stack([self(task) for task in x])  # [T, B, D]
        if x.dim() == 5:
            n_tasks, items = x.shape[:2]
            h = x.flatten(0, 1)  # [T*B, C, H, W]: one conv call for all tasks
        elif x.dim() == 4:
            n_tasks, items = 1, None
            h = x
        else:
            raise MetarunError(
                f"Conv4 expects images [B, C, H, W] or [T, B, C, H, W], got shape {tuple(x.shape)}; "
                f"check the dataset transform"
            )
        for block in self.blocks:
            h = block(h, n_tasks)
        h = h.flatten(1)  # [T*B, D]
        if h.shape[1] != self.out_features:
            raise MetarunError(
                f"Conv4 was built for {self.image_size}x{self.image_size} images but got "
                f"{x.shape[-2]}x{x.shape[-1]}; set model.image_size={x.shape[-1]}"
            )
        return h if items is None else h.unflatten(0, (n_tasks, items))  # [T, B, D]
