"""Picking the device and the mixed-precision context from `device.type` and `device.amp`."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from metarun.errors import MetarunError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(kind: str) -> torch.device:
    """`auto` is CUDA when PyTorch sees a GPU, else the CPU; an explicit `cuda` never falls back."""
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MetarunError(
            f"device=cuda but PyTorch {torch.__version__} sees no CUDA device on this machine; "
            "use device=cpu or device=auto"
        )
    return torch.device(kind)


def check_amp(device: torch.device, amp: str) -> None:
    if amp == "fp16" and device.type != "cuda":
        raise MetarunError(f"device.amp=fp16 needs CUDA but the run is on {device.type}; use device.amp=bf16 there")


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    """A fresh autocast context for one forward pass (a no-op for amp=none)."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])
