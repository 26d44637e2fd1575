"""ResNet-18 (He et al., 2016) as "A Closer Look at Few-shot Classification" (Chen et al., 2019) uses it.

Stem [conv, batch norm, ReLU], then layer1..layer4 of 2 BasicBlocks each, with 64-128-256-512
channels (strides 1, 2, 2, 2), then global average pooling: a 512-feature embedding at any image size.
torchvision.models.resnet18's trunk, parameter for parameter (same names and shapes, its init), with
two changes:
  * every batch norm is a TaskBatchNorm called with `n_tasks` (metarun.models.layers), so each task of
    a meta-batch is normalized with its own statistics (`batch_norm=task`) or running statistics are
    kept for evaluation (`batch_norm=running`);
  * the stem follows the image size (Chen et al. feed ResNets 224x224 images; few-shot sets are small):
      image_size >= 100   torchvision's: 7x7 stride-2 conv and 3x3 stride-2 max-pool (224 -> 56 -> ... -> 7)
      33 to 99            the same conv, no max-pool (84 -> 42 -> 42 -> 21 -> 11 -> 6)
      32 and smaller      a 3x3 stride-1 conv, no max-pool, as He et al.'s CIFAR ResNets (32 -> 32 -> 16 -> 8 -> 4)
`width` scales every channel count (64: the real network).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet

from metarun.errors import MetarunError
from metarun.models.layers import Backbone, TaskBatchNorm, check_batch_norm


class BasicBlock(resnet.BasicBlock):
    """torchvision's BasicBlock (its __init__: the same modules and names), with a forward that passes
    `n_tasks` to each batch norm, which torchvision's forward cannot:
    relu(bn2(conv2(relu(bn1(conv1(x))))) + x), x through `downsample` [1x1 conv, batch norm] when the
    shape changes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.relu  # torchvision's in-place ReLU module; forward applies F.relu, out of place

    def forward(self, x: Tensor, n_tasks: int) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x), n_tasks))
        out = self.bn2(self.conv2(out), n_tasks)
        if self.downsample is not None:
            conv, norm = self.downsample
            x = norm(conv(x), n_tasks)
        return F.relu(out + x)


class ResNet18(Backbone):
    """ResNet-18 embedding network for square `image_size` inputs of `in_channels` channels."""

    def __init__(
        self, in_channels: int = 3, image_size: int = 84, batch_norm: str = "task", width: int = 64
    ):
        super().__init__()
        check_batch_norm(batch_norm)
        for key, value, fix in (
            ("in_channels", in_channels, "${dataset.channels} (the default)"),
            ("image_size", image_size, "${dataset.image_size} (the default)"),
            ("width", width, "64 (the real ResNet-18) or 8 for a quick test"),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MetarunError(
                    f"model.{key}={value!r} must be a positive integer; set model.{key}={fix}"
                )
        self.in_channels, self.image_size, self.batch_norm, self.width = (
            in_channels,
            image_size,
            batch_norm,
            width,
        )

        def norm(channels: int) -> TaskBatchNorm:
            return TaskBatchNorm(channels, batch_norm)

        if image_size <= 32:
            self.conv1 = resnet.conv3x3(in_channels, width)
        else:
            self.conv1 = nn.Conv2d(
                in_channels, width, kernel_size=7, stride=2, padding=3, bias=False
            )
        self.bn1 = norm(width)
        self.maxpool = image_size >= 100
        channels = width
        for i, (planes, stride) in enumerate(
            ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)), 1
        ):
            downsample = None
            if stride != 1 or channels != planes:
                downsample = nn.Sequential(resnet.conv1x1(channels, planes, stride), norm(planes))
            # A ModuleList, not torchvision's nn.Sequential: a block needs n_tasks, which Sequential cannot pass.
            setattr(
                self,
                f"layer{i}",
                nn.ModuleList(
                    [
                        BasicBlock(channels, planes, stride, downsample, norm_layer=norm),
                        BasicBlock(planes, planes, norm_layer=norm),
                    ]
                ),
            )
            channels = planes
        for m in (
            self.modules()
        ):  # torchvision's init; TaskBatchNorm starts at weight 1, bias 0 as it sets
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.finish((in_channels, image_size, image_size))

    def features(self, h: Tensor, n_tasks: int) -> Tensor:
        h = F.relu(self.bn1(self.conv1(h), n_tasks))
        if self.maxpool:
            h = F.max_pool2d(h, kernel_size=3, stride=2, padding=1)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                h = block(h, n_tasks)
        return F.adaptive_avg_pool2d(h, 1)  # [T*B, 8*width, 1, 1]
