"""A trained run read back from its directory: its config, changed only as evaluation may change it,
and its learner restored from a checkpoint. Nothing in the run directory is written.

  RUN_DIR/.hydra/config.yaml   the config the run trained with (the trainer writes it)
  RUN_DIR/checkpoints/best.pt  the best validation checkpoint; last.pt the last one

Evaluation may change what draws and scores the test tasks (`eval.*`), the data they come from
(`dataset=...`, `dataset.*`: another split, or another dataset whose images the model takes), the
learner's test-time settings (`algorithm.eval_adaptation_steps`, `model.batch_norm`) and where it
runs (`device=...`, `device.*`). Everything else made the checkpoint and stays as the run had it.
Overrides are Hydra's syntax, applied as Hydra applies them: a group option replaces the group's
node (composed from conf/ by Hydra), a key is set in place, and a key the run does not have is an
error. The learner is built by the trainer's own code, so an evaluation without
overrides is the run's own test, number for number.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metarun.algorithms.base import MetaLearner
from metarun.checkpoint import load_checkpoint
from metarun.config import Config, check_resolves, eval_episode
from metarun.errors import MetarunError
from metarun.hydra_errors import describe
from metarun.trainer import Trainer

CHECKPOINTS = ("best", "last")
CHANGEABLE_GROUPS = ("dataset", "device")
CHANGEABLE_KEYS = ("eval.", "dataset.", "device.", "algorithm.eval_adaptation_steps", "model.batch_norm")
CHANGEABLE = "eval.*, dataset=... and dataset.*, device=... and device.*, algorithm.eval_adaptation_steps, model.batch_norm"
EPISODE_KEYS = ("n_way", "k_shot", "n_query")
RUNNING_STATISTICS = ("running_mean", "running_var")


def open_run(run_dir: str | Path, overrides: Sequence[str] = (), checkpoint: str = "best",
             parts: Sequence[str] = ("test",)) -> tuple[Trainer, dict[str, Any]]:
    """The run's learner with the checkpoint's weights, under its config changed by `overrides`;
    and the checkpoint (its "step", ...). Every problem is one MetarunError line; those of the
    command, the config and the checkpoint file are found before the dataset is read."""
    run_dir = Path(run_dir)
    cfg = changed_config(read_config(run_dir), overrides)
    check_images_fit_model(cfg)
    path = checkpoint_path(run_dir, checkpoint)
    state = load_checkpoint(path, fix=checkpoint_fix(run_dir, checkpoint, "train it again"))
    # The trainer's own building and checks (dataset, learner, episodes of `parts` only); it writes nothing.
    evaluator = Trainer(cfg, run_dir, parts=parts, resume=False)
    restore(evaluator.learner, state, path)
    return evaluator, state


def read_config(run_dir: Path) -> DictConfig:
    """The config the run trained with, on the schema, every interpolation resolved now: so keys
    that follow another (model.in_channels: ${dataset.channels}) keep the values the checkpoint was
    trained with when evaluation changes what they followed."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        problem = "does not exist" if not run_dir.exists() else "holds no .hydra/config.yaml"
        raise MetarunError(f"{run_dir} {problem}; give the directory of a metarun run (outputs/<date>/<time>_...)")
    try:
        saved = OmegaConf.load(path)
        if not isinstance(saved, DictConfig):
            raise ValueError("not a mapping")
        check_resolves(saved)
        return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(saved, resolve=True))
    except MetarunError:
        raise
    except Exception as e:  # not YAML, not a mapping, keys the schema does not know
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MetarunError(f"{path} is not the config of a metarun run ({reason[:120]}); "
                           "give the directory of a run that metarun wrote") from None


def changed_config(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """A copy of `cfg` with evaluation's `overrides` applied: group options first, then keys, as
    Hydra orders them. `eval.episode=NAME` sets eval.n_way, k_shot and n_query from
    conf/episode/NAME.yaml (a resolved config no longer follows it), unless they are given too."""
    cfg = copy.deepcopy(cfg)
    parsed = parse_overrides(overrides)
    groups = [o for o in parsed if "." not in o.key_or_group]
    if groups:
        chosen = compose_groups([o.input_line for o in groups])
        for o in groups:
            cfg[o.key_or_group] = chosen[o.key_or_group]
    for o in parsed:
        if "." in o.key_or_group:
            set_key(cfg, o)
    given = {o.key_or_group for o in parsed}
    if "eval.episode" in given:
        for key in EPISODE_KEYS:
            if f"eval.{key}" not in given:
                cfg.eval[key] = eval_episode(cfg.eval.episode, key, cfg.episode[key])
    return cfg


def parse_overrides(overrides: Sequence[str]) -> list[Override]:
    """Hydra's parse of `overrides`, each checked to be a change evaluation may make."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise MetarunError(f"{describe(e)}; write each override as key=value") from None
    for o in parsed:
        line, key = o.input_line, o.key_or_group
        if o.is_sweep_override():
            raise MetarunError(f"{line}: metarun-eval tests one setting at a time; give one value and run it once per value")
        if o.is_add() or o.is_force_add() or o.is_delete() or o.package is not None:
            raise MetarunError(f"{line}: evaluation only changes keys the run has; write it as {key}=VALUE")
        allowed = key in CHANGEABLE_GROUPS if "." not in key else key.startswith(CHANGEABLE_KEYS)
        if not allowed:
            raise MetarunError(f"{line}: {key} cannot change when a run is tested again (the checkpoint was "
                               f"trained with it); change only {CHANGEABLE}, or train a new run")
    return parsed


def compose_groups(lines: list[str]) -> DictConfig:
    """The config Hydra composes from conf/ with these `group=option` overrides."""
    try:
        with initialize_config_module("metarun.conf", version_base="1.3"):
            return compose("config", overrides=lines)
    except (HydraException, OmegaConfBaseException) as e:
        raise MetarunError(describe(e)) from None


def set_key(cfg: DictConfig, override: Override) -> None:
    key, line = override.key_or_group, override.input_line
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key)
    if not isinstance(parent, DictConfig) or name not in parent.keys():
        keys = [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []
        close = difflib.get_close_matches(name, keys, n=1)
        fix = f"did you mean {parent_key}.{close[0]}?" if close else f"its {parent_key} has {', '.join(keys) or 'no keys'}"
        raise MetarunError(f"{line}: this run's config has no {key}; {fix}")
    try:
        OmegaConf.update(cfg, key, override.value(), merge=True)
    except OmegaConfBaseException as e:
        reason = str(e).strip().splitlines()[0]
        raise MetarunError(f"{line}: {reason}; give {key} a value of its type "
                           f"(it is {OmegaConf.select(cfg, key)!r} in this run)") from None


def check_images_fit_model(cfg: DictConfig) -> None:
    """Another dataset's images must have the channels and size the run's model was built for."""
    for model_key, data_key in (("in_channels", "channels"), ("image_size", "image_size")):
        trained, given = OmegaConf.select(cfg, f"model.{model_key}"), OmegaConf.select(cfg, f"dataset.{data_key}")
        if trained is not None and given is not None and trained != given:
            raise MetarunError(f"dataset.{data_key}={given} but this run's model takes images of {data_key}={trained}; "
                               f"set dataset.{data_key}={trained} (the dataset converts its images)")


def checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    if checkpoint not in CHECKPOINTS:
        raise MetarunError(f"checkpoint={checkpoint} is not one of {', '.join(CHECKPOINTS)}; "
                           "give checkpoint=best (the best validation) or checkpoint=last")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file():
        raise MetarunError(f"{run_dir} has no checkpoints/{checkpoint}.pt; "
                           f"{checkpoint_fix(run_dir, checkpoint, 'train it first')}")
    return path


def checkpoint_fix(run_dir: Path, checkpoint: str, train: str) -> str:
    """'train it first or give checkpoint=last': the other checkpoint, where the run has it."""
    other = CHECKPOINTS[1 - CHECKPOINTS.index(checkpoint)]
    if (run_dir / "checkpoints" / f"{other}.pt").is_file():
        return f"{train} or give checkpoint={other}"
    return f"{train} (metarun ... hydra.run.dir={run_dir})"


def restore(learner: MetaLearner, state: dict[str, Any], path: Path) -> None:
    """Load the checkpoint's learner weights. A run trained with running batch-norm statistics may
    be tested without them (model.batch_norm=task); one trained without has none to test with."""
    weights = dict(state.get("learner") or {})
    expected = learner.state_dict().keys()
    missing, unexpected = expected - weights.keys(), weights.keys() - expected
    if missing and all(key.endswith(RUNNING_STATISTICS) for key in missing):
        raise MetarunError("model.batch_norm=running needs running statistics, which this run did not keep (it "
                           "trained with model.batch_norm=task); test it with model.batch_norm=task")
    if unexpected and all(key.endswith(RUNNING_STATISTICS) for key in unexpected):
        weights = {key: value for key, value in weights.items() if key not in unexpected}
    try:
        learner.load_state_dict(weights)
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:200]
        raise MetarunError(f"{path} does not fit the learner this config builds ({reason}); sizes that follow the "
                           "training data (Baseline's head over the training classes) need the run's own dataset") from None
