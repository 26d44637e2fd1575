"""Backbones that embed images: `[B, C, H, W] -> [B, D]` and `[T, B, C, H, W] -> [T, B, D]`.

Every backbone meets `metarun.models.layers.Backbone`'s protocol and takes its batch norm and
other shared layers from `metarun.models.layers`; one backbone a file.
"""

from metarun.models.conv4 import Conv4
from metarun.models.layers import Backbone, Classifier, TaskBatchNorm
from metarun.models.mlp import MLP
from metarun.models.resnet12 import ResNet12
from metarun.models.resnet18 import ResNet18
from metarun.models.timm_model import TimmBackbone

__all__ = [
    "MLP",
    "Backbone",
    "Classifier",
    "Conv4",
    "ResNet12",
    "ResNet18",
    "TaskBatchNorm",
    "TimmBackbone",
]
