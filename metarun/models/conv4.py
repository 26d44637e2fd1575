"""Conv-4 backbone (Vinyals et al., 2016; Finn et al., 2017).

`layers` blocks of [3x3 conv (padding 1), batch norm, ReLU, 2x2 max-pool]; the flattened feature
map is the embedding (64 features for 28x28 Omniglot: 28 -> 14 -> 7 -> 3 -> 1; 1600 for 84x84
mini-ImageNet). `hidden=32` is MAML's mini-ImageNet network. `pool_layers` blocks (the first
ones) downsample, all by default; Relation Networks (Sung et al., 2018) pool only the first two,
keeping a 64x7x7 map for 28x28 Omniglot (the paper's unpadded first two convs give 64x5x5).
`downsample="stride"` is MAML's Omniglot network (cbfinn/maml with --max_pool=False, the default of
its Omniglot commands): those blocks downsample by a stride-2 conv instead of max-pooling
(28 -> 14 -> 7 -> 4 -> 2), and the last map is averaged over its positions into `hidden` features,
as that code's `tf.reduce_mean(hidden4, [1, 2])` (64 on Omniglot, as with max-pooling).
Batch norm is per task (`batch_norm=task`, the default) or keeps running statistics for
evaluation (`batch_norm=running`): metarun.models.layers. It has a learned scale and shift;
MAML's code has the shift only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from metarun.errors import MetarunError
from metarun.models.layers import Backbone, TaskBatchNorm, check_batch_norm

DOWNSAMPLE = ("pool", "stride")


class ConvBlock(nn.Module):
    """3x3 conv (stride `stride`) -> per-task batch norm -> ReLU -> 2x2 max-pool (if `pool`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        pool: bool = True,
        batch_norm: str = "task",
        stride: int = 1,
    ):
        super().__init__()
        # No conv bias: the batch-norm mean subtraction cancels it (its gradient is exactly zero).
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.norm = TaskBatchNorm(out_channels, batch_norm)
        self.pool = pool

    def forward(self, x: Tensor, n_tasks: int = 1) -> Tensor:
        h = F.relu(self.norm(self.conv(x), n_tasks))
        return F.max_pool2d(h, 2) if self.pool else h


class Conv4(Backbone):
    """Conv-4 embedding network for square `image_size` inputs of `in_channels` channels."""

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        layers: int = 4,
        image_size: int = 28,
        pool_layers: int | None = None,
        batch_norm: str = "task",
        downsample: str = "pool",
    ):
        super().__init__()
        check_batch_norm(batch_norm)
        if downsample not in DOWNSAMPLE:
            raise MetarunError(
                f"model.downsample={downsample!r} is not one of {', '.join(DOWNSAMPLE)}; set model."
                "downsample=pool (2x2 max-pooling) or stride (stride-2 convs, MAML's Omniglot net)"
            )
        if pool_layers is None:
            pool_layers = layers
        if (
            isinstance(pool_layers, bool)
            or not isinstance(pool_layers, int)
            or not 0 <= pool_layers <= layers
        ):
            raise MetarunError(
                f"model.pool_layers={pool_layers!r} must be an integer from 0 to model.layers={layers}; "
                f"set model.pool_layers=null to pool in every block"
            )
        if (
            downsample == "pool" and image_size // 2**pool_layers < 1
        ):  # a stride-2 conv keeps at least 1x1
            raise MetarunError(
                f"model.layers={layers} pools a {image_size}x{image_size} image down to nothing; "
                f"lower model.layers (or model.pool_layers) or set model.image_size to the dataset's image size"
            )
        self.in_channels, self.image_size = in_channels, image_size
        self.pool_layers, self.batch_norm, self.downsample = pool_layers, batch_norm, downsample
        channels = [in_channels] + [hidden] * layers
        strided = downsample == "stride"
        self.blocks = nn.ModuleList(
            ConvBlock(
                c_in,
                c_out,
                pool=i < pool_layers and not strided,
                batch_norm=batch_norm,
                stride=2 if i < pool_layers and strided else 1,
            )
            for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:]))
        )
        self.finish((in_channels, image_size, image_size))

    def features(self, h: Tensor, n_tasks: int) -> Tensor:
        for block in self.blocks:
            h = block(h, n_tasks)
        if self.downsample == "stride":
            return h.mean(dim=(2, 3), keepdim=True)  # [T*B, hidden, 1, 1], as MAML's Omniglot code
        return h
