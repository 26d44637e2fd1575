"""Backbones that embed images: `[B, C, H, W] -> [B, D]` and `[T, B, C, H, W] -> [T, B, D]`."""

from metarun.models.conv4 import Conv4, task_batch_norm

__all__ = ["Conv4", "task_batch_norm"]
