"""Checkpoints that survive a kill at any moment and fail loudly when they are not ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from metarun.atomic import write_atomically
from metarun.errors import MetarunError

FORMAT = "metarun-checkpoint-v1"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Save `state`, tagged with our format, so that a kill at any moment leaves a loadable file."""
    write_atomically(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(
    path: Path, map_location: torch.device | str = "cpu", fix: str | None = None
) -> dict[str, Any]:
    """Load a checkpoint written by save_checkpoint; anything else is one MetarunError line ending
    in `fix` (by default: how a training run starts over)."""
    fix = fix or f"delete {path} to start this run over, or choose a new hydra.run.dir"
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of foreign objects, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MetarunError(f"cannot read checkpoint {path} ({reason[:120]}); {fix}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MetarunError(f"{path} is not a metarun checkpoint; {fix}")
    return state
