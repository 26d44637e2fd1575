"""Weights a run starts from another run: `model.init` (the other run's backbone as this run's
initial backbone) and `algorithm.teacher` (a pretraining run's network, whose predictions
`algorithm=pretrain` distils). Both read a run directory, which must have finished (its tested
checkpoint: `train.test_checkpoint`, best.pt by default), or a checkpoint file of a run, finished
or not. Only training reads them; a trained run keeps its own weights and records where they
started (`results.json`'s `init`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.utils import get_object
from omegaconf import OmegaConf

from metarun import run_dir as files
from metarun.algorithms.base import MetaLearner
from metarun.checkpoint import load_checkpoint
from metarun.config import build, target_node
from metarun.errors import MetarunError
from metarun.saved_run import check_finished, read_config


@dataclass
class SourceRun:
    """A checkpoint of another run, with the config it was trained under."""

    key: str  # the config key that named it, for messages
    checkpoint: Path
    run_dir: Optional[Path]
    state: dict[str, Any]
    config: dict[str, Any]

    def entry(self) -> dict[str, Any]:
        """What results.json records about it."""
        run = None if self.run_dir is None else str(self.run_dir)
        return {"checkpoint": str(self.checkpoint), "run": run, "step": self.state.get("step")}

    def learner_class(self) -> type[MetaLearner]:
        return get_object(self.config["algorithm"]["_target_"])

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The source learner's backbone weights and buffers, named as in the backbone."""
        prefix = self.learner_class().backbone_prefix + "."
        learner = self.state["learner"]
        return {k.removeprefix(prefix): v for k, v in learner.items() if k.startswith(prefix)}


def open_source(source: str, key: str, device: torch.device | str = "cpu") -> SourceRun:
    """The checkpoint `source` names: a run directory (its tested checkpoint) or a checkpoint file.
    Every problem is one MetarunError line naming `key`."""
    path = Path(source).expanduser()
    if path.is_dir():
        check_finished(path, f"{key}={path}/checkpoints/{{}}.pt")
        config = read_config(path)
        name = OmegaConf.select(config, "train.test_checkpoint", default="best")
        name = getattr(name, "value", name)  # the schema's enum, or a plain string from before it
        checkpoint, run_dir = files.checkpoint_file(path, name), path
        if not checkpoint.is_file():
            raise MetarunError(
                f"{key}={source}: the run has no checkpoints/{name}.pt; name a checkpoint file of "
                "it instead, or train it again"
            )
    elif path.is_file():
        checkpoint = path
        run_dir = path.parent.parent if files.is_run_dir(path.parent.parent) else None
    else:
        raise MetarunError(
            f"{key}={source} does not exist; give a run directory or a checkpoint file "
            "(RUN/checkpoints/best.pt)"
        )
    state = load_checkpoint(checkpoint, device, fix=f"give {key} another run or checkpoint")
    if "learner" not in state:
        raise MetarunError(
            f"{key}={source} is not a metarun checkpoint (it has no learner weights); give a run "
            "directory or one of its checkpoints/*.pt"
        )
    if run_dir is not None:
        config = OmegaConf.to_container(read_config(run_dir), resolve=True, enum_to_str=True)
    elif "config" in state:
        config = state["config"]
    else:
        raise MetarunError(
            f"{key}={source}: a checkpoint outside its run directory needs the run's config, which "
            "only last.pt keeps; give the run directory, or its checkpoints/last.pt"
        )
    return SourceRun(key, checkpoint, run_dir, state, config)


def init_backbone(learner: MetaLearner, source: SourceRun) -> None:
    """Replace `learner`'s backbone weights by the source's; a backbone of another shape is one
    line naming the keys that differ."""
    target = learner.backbone
    own, given = target.state_dict(), source.backbone_state()
    missing = sorted(own.keys() - given.keys())
    unexpected = sorted(given.keys() - own.keys())
    shapes = [
        f"{k} {list(given[k].shape)} vs {list(own[k].shape)}"
        for k in sorted(own.keys() & given.keys())
        if own[k].shape != given[k].shape
    ]
    if missing or unexpected or shapes:
        differences = (("missing", missing), ("unexpected", unexpected), ("shape of", shapes))
        found = [f"{what} {', '.join(keys[:3])}" for what, keys in differences if keys]
        raise MetarunError(
            f"{source.key}={source.checkpoint}: its backbone does not fit this run's "
            f"({'; '.join(found)}); give the same model settings as the source run "
            "(model=..., model.hidden, model.batch_norm)"
        )
    target.load_state_dict(given)


def source_learner(source: SourceRun, device: torch.device | str) -> MetaLearner:
    """The source run's whole learner (a teacher), built from its config and weights without its
    dataset; the number of training classes is read from the weights of its classifier."""
    config = source.config
    algorithm = OmegaConf.create(config["algorithm"])
    classifier = source.state["learner"].get("classifier.weight")
    if classifier is None:
        raise MetarunError(
            f"{source.key}={source.checkpoint} was not trained by algorithm=pretrain (it has no "
            "classifier over the training classes); give a pretraining run"
        )
    model = build(target_node(OmegaConf.create(config), "model"))
    n_way = config["episode"]["n_way"]
    learner = build(algorithm, model=model, n_way=n_way, n_train_classes=len(classifier))
    learner.load_state_dict(source.state["learner"], strict=False)
    return learner.to(device)
