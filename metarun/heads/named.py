"""A head from its config name (`eval.head=logreg`: conf/head/logreg.yaml), with options on top."""

from __future__ import annotations

from importlib.resources import files
from typing import Any, Mapping

from omegaconf import OmegaConf

from metarun.config import build
from metarun.errors import MetarunError
from metarun.heads.base import Head


def head_names() -> list[str]:
    folder = files("metarun.conf") / "head"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def named_head(name: str, options: Mapping[str, Any] = {}, key: str = "eval.head") -> Head:
    """The head conf/head/NAME.yaml builds, its keys replaced by `options` (eval.head_options)."""
    path = files("metarun.conf") / "head" / f"{name}.yaml"
    if not path.is_file():
        raise MetarunError(
            f"{key}={name} is not in conf/head/; choose one of: {', '.join(head_names())}"
        )
    node = OmegaConf.create(path.read_text())
    unknown = sorted(set(options) - set(node) - {"_target_"})
    if unknown:
        known = ", ".join(k for k in node if k != "_target_") or "none"
        raise MetarunError(
            f"eval.head_options has {', '.join(unknown)}, which head={name} does not take; "
            f"its options: {known}"
        )
    return build(OmegaConf.merge(node, dict(options)))
