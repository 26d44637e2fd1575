"""ResNet-12 backbone (Oreshkin et al., 2018, TADAM; Lee et al., 2019, MetaOptNet).

4 blocks of [3 x (3x3 conv, batch norm, LeakyReLU 0.1; none after the third norm) + (1x1 conv, batch
norm) shortcut, add, LeakyReLU 0.1, 2x2 max-pool], 64-160-320-640 channels by default.
The flattened feature map is the embedding, as MetaOptNet's: 640x5x5 = 16000 features for 84x84
mini-ImageNet (84 -> 42 -> 21 -> 10 -> 5), 640x2x2 for 32x32 CIFAR, 640x1x1 for 28x28 Omniglot;
`pool="avg"` takes the map's channel means instead (640 features), as RFS and Meta-Baseline do.
DropBlock (Ghiasi et al., 2018) after the last two blocks' pools when `drop_rate > 0`, in training only,
as MetaOptNet (which also drops plain units in the first two blocks and ramps the rate up over
training; neither is done here). Its masks come from torch's global RNG, which the trainer seeds and
checkpoints. Batch norm is per task (`batch_norm=task`) or keeps running statistics for evaluation
(`batch_norm=running`): metarun.models.layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.errors import MetarunError
from metarun.models.layers import Backbone, TaskBatchNorm, check_batch_norm

DEFAULT_CHANNELS = (64, 160, 320, 640)


def drop_block(x: Tensor, drop_rate: float, block_size: int) -> Tensor:
    """DropBlock on `x [B, C, H, W]`: zero `block_size` squares, about `drop_rate` of the positions
    in all, and rescale the rest so the mean activation is kept.

    Seeds are drawn where a whole block fits, with the rate that makes the blocks cover `drop_rate`
    of the map (Ghiasi et al., eq. 1); a block larger than the map is shrunk to it.
    """
    height, width = x.shape[-2:]
    size = min(block_size, height, width)
    seed_h, seed_w = height - size + 1, width - size + 1
    gamma = drop_rate / size**2 * height * width / (seed_h * seed_w)
    seeds = torch.bernoulli(
        torch.full((*x.shape[:-2], seed_h, seed_w), gamma, dtype=x.dtype, device=x.device)
    )
    # Each seed at (i, j) grows into the block [i, i + size) x [j, j + size): [B, C, H, W]
    dropped = F.max_pool2d(F.pad(seeds, (size - 1,) * 4), size, stride=1)
    keep = 1 - dropped
    return x * keep * (keep.numel() / keep.sum().clamp(min=1))


class ResidualBlock(nn.Module):
    """3 x [3x3 conv, batch norm, LeakyReLU] (no activation after the last norm) + 1x1 conv shortcut,
    add, LeakyReLU, 2x2 max-pool, DropBlock when `drop_rate > 0` and training."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        batch_norm: str,
        drop_rate: float = 0.0,
        block_size: int = 1,
    ):
        super().__init__()
        # No conv biases: the batch-norm mean subtraction cancels them.
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = TaskBatchNorm(out_channels, batch_norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = TaskBatchNorm(out_channels, batch_norm)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = TaskBatchNorm(out_channels, batch_norm)
        self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.shortcut_norm = TaskBatchNorm(out_channels, batch_norm)
        self.drop_rate, self.block_size = drop_rate, block_size

    def forward(self, x: Tensor, n_tasks: int = 1) -> Tensor:
        h = F.leaky_relu(self.norm1(self.conv1(x), n_tasks), 0.1)
        h = F.leaky_relu(self.norm2(self.conv2(h), n_tasks), 0.1)
        h = self.norm3(self.conv3(h), n_tasks)
        h = F.leaky_relu(h + self.shortcut_norm(self.shortcut_conv(x), n_tasks), 0.1)
        h = F.max_pool2d(h, 2)  # [B, C_out, H/2, W/2]
        if self.training and self.drop_rate > 0:
            h = drop_block(h, self.drop_rate, self.block_size)
        return h


class ResNet12(Backbone):
    """ResNet-12 embedding network for square `image_size` inputs of `in_channels` channels."""

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 84,
        channels: list[int] | None = None,
        drop_rate: float = 0.0,
        dropblock_size: int = 5,
        batch_norm: str = "task",
        pool: str = "flatten",
    ):
        super().__init__()
        check_batch_norm(batch_norm)
        if pool not in ("flatten", "avg"):
            raise MetarunError(
                f"model.pool={pool!r} is not flatten or avg; set model.pool=flatten (the 640x5x5 "
                "map, MetaOptNet's) or avg (its channel means, RFS's and Meta-Baseline's)"
            )
        self.pool = pool
        channels = list(
            DEFAULT_CHANNELS if channels is None else channels
        )  # also an OmegaConf ListConfig
        if len(channels) != 4 or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels
        ):
            raise MetarunError(
                f"model.channels={channels} must be 4 positive integers, one per block; "
                "set model.channels=[64,160,320,640] (MetaOptNet's)"
            )
        if (
            isinstance(drop_rate, bool)
            or not isinstance(drop_rate, (int, float))
            or not 0 <= drop_rate < 1
        ):
            raise MetarunError(
                f"model.drop_rate={drop_rate!r} must be in [0, 1); "
                "set model.drop_rate=0.1 (MetaOptNet's) or 0 to turn DropBlock off"
            )
        if (
            isinstance(dropblock_size, bool)
            or not isinstance(dropblock_size, int)
            or dropblock_size < 1
        ):
            raise MetarunError(
                f"model.dropblock_size={dropblock_size!r} must be an integer of at least 1; "
                "set model.dropblock_size=5 (MetaOptNet's mini-ImageNet value; 2 on CIFAR)"
            )
        if image_size < 16:
            raise MetarunError(
                f"model.image_size={image_size} is too small for ResNet-12's 4 max-pools; "
                "use images of at least 16 pixels"
            )
        self.in_channels, self.image_size, self.channels = in_channels, image_size, channels
        self.drop_rate, self.dropblock_size, self.batch_norm = (
            float(drop_rate),
            dropblock_size,
            batch_norm,
        )
        widths = [in_channels] + channels
        self.blocks = nn.ModuleList(
            ResidualBlock(c_in, c_out, batch_norm, drop_rate if i >= 2 else 0.0, dropblock_size)
            for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:]))
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # MetaOptNet's initialization
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
        self.finish((in_channels, image_size, image_size))

    def features(self, h: Tensor, n_tasks: int) -> Tensor:
        for block in self.blocks:
            h = block(h, n_tasks)
        return h.mean(dim=(2, 3)) if self.pool == "avg" else h
