"""A trained run read back from its directory: its config, changed only as evaluation may change it,
and its learner restored from a checkpoint. Nothing in the run directory is written.

  RUN_DIR/.hydra/config.yaml   the config the run trained with (the trainer writes it)
  RUN_DIR/checkpoints/best.pt  the best validation checkpoint; last.pt the last one
  RUN_DIR/results.json         its test, written last: the run is finished

A run that is still training, stopped before its test, or whose results.json is damaged is read
only when a checkpoint is named (`checkpoint=best|last`); otherwise each such state, and a damaged
config or checkpoint, is one MetarunError line saying what to do.

Evaluation may change what draws and scores the test tasks (`eval.*`), the data they come from
(`dataset=...`, `dataset.*`: another split, or another dataset whose images the model takes), the
learner's test-time settings (`algorithm.eval_adaptation_steps`, `model.batch_norm`) and where it
runs (`device=...`, `device.*`). Everything else made the checkpoint and stays as the run had it.
Overrides are Hydra's syntax, applied as Hydra applies them: a group option replaces the group's
node (composed from conf/ by Hydra), a key is set in place, and a key the run does not have is an
error. The learner is built as the run built it (metarun.experiment), so an evaluation
without overrides is the run's own test, number for number.

Images reach the learner normalized as in training: another dataset's (Chen et al., 2019, "A Closer
Look at Few-shot Classification": source and target under one normalization) with the training
dataset's mean and std, which checkpoints record (`eval.normalization=target`: the target's own).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metarun import run_dir as files
from metarun.algorithms.base import MetaLearner
from metarun.checkpoint import load_checkpoint
from metarun.config import (
    Config,
    Normalization,
    build,
    check_resolves,
    config_container,
    eval_episode,
)
from metarun.data.sampler import EpisodeSampler, normalization
from metarun.errors import MetarunError
from metarun.experiment import Experiment
from metarun.hydra_errors import describe
from metarun.lock import RunDirBusy, check_run_dir_free

CHECKPOINTS = files.CHECKPOINTS
MeanStd = tuple[list[float], list[float]]
CHANGEABLE_GROUPS = ("dataset", "device")
CHANGEABLE_KEYS = (
    "eval.",
    "dataset.",
    "device.",
    "algorithm.eval_adaptation_steps",
    "model.batch_norm",
)
CHANGEABLE = "eval.*, dataset=... and dataset.*, device=... and device.*, algorithm.eval_adaptation_steps, model.batch_norm"
EPISODE_KEYS = ("n_way", "k_shot", "n_query")
RUNNING_STATISTICS = ("running_mean", "running_var")


class SavedRun(NamedTuple):
    experiment: Experiment  # the learner with the checkpoint's weights, the episodes of `parts`
    state: dict[str, Any]  # the checkpoint: "step", ...
    checkpoint: str  # "best" or "last"
    mean_std: Optional[MeanStd]  # how images reaching the learner are normalized


def open_run(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    checkpoint: Optional[str] = None,
    parts: Sequence[str] = ("test",),
    option: str = "checkpoint={}",
) -> SavedRun:
    """The run's learner with the checkpoint's weights, under its config changed by `overrides`.
    `checkpoint` None: the checkpoint a finished run tested (train.test_checkpoint, best.pt by
    default); named ("best", "last"): that checkpoint, finished
    or not. Every problem is one MetarunError line, whose fixes name the checkpoint as `option`
    does (metarun-eval's `checkpoint={}`); those of the command, the run directory, the config and
    the checkpoint file are found before the dataset is read."""
    run_dir = Path(run_dir)
    saved = read_config(run_dir)
    cfg = changed_config(saved, overrides)
    check_images_fit_model(cfg)
    if checkpoint is None:
        check_finished(run_dir, option)
    # A finished run's tested checkpoint (train.test_checkpoint: best.pt unless it tests last.pt).
    tested = OmegaConf.select(saved, "train.test_checkpoint", default="best")
    chosen = getattr(tested, "value", tested) if checkpoint is None else checkpoint
    path = checkpoint_path(run_dir, chosen, option)
    state = load_checkpoint(path, fix=checkpoint_fix(run_dir, chosen, "train it again", option))
    # A run's own building and checks (dataset, learner, episodes of `parts` only); it writes nothing.
    experiment = Experiment(cfg, parts=parts)
    restore(experiment.learner, state, path)
    experiment.give_base_statistics(state.get("base_statistics"), str(path))
    mean_std = images_normalization(saved, cfg, state, experiment)
    for sampler in experiment.samplers.values():
        if isinstance(sampler, EpisodeSampler):
            sampler.mean_std = mean_std
    return SavedRun(experiment, state, chosen, mean_std)


def images_normalization(
    saved: DictConfig, cfg: DictConfig, state: dict[str, Any], experiment: Experiment
):
    """The (mean, std) that images reaching the learner are normalized with (as sampler.normalization
    gives them): the training dataset's, as the checkpoint records it (a checkpoint too old to record
    it: read from the run's dataset), unless eval.normalization=target asks for the dataset's own.
    A backbone with its own normalization (a pretrained timm model) always takes its own."""
    own = normalization(experiment.mean, experiment.std)
    if hasattr(experiment.learner.backbone, "input_normalization"):
        return own
    if cfg.eval.normalization == Normalization.target:
        return own
    if "normalization" in state:
        recorded = state["normalization"]
        return None if recorded is None else normalization(recorded["mean"], recorded["std"])
    if config_container(saved.dataset) == config_container(cfg.dataset):
        return own  # the run's own dataset
    try:
        trained_on = build(saved.dataset)
    except MetarunError as e:
        raise MetarunError(
            f"this run's checkpoint does not record the mean and std its model learned with, and its "
            f"training dataset cannot be read to find them ({e}); make that dataset readable where the "
            "run's config says, or give eval.normalization=target to use the tested dataset's own"
        ) from None
    return normalization(getattr(trained_on, "mean", None), getattr(trained_on, "std", None))


def check_finished(run_dir: Path, option: str) -> None:
    """A finished run: no live process trains it and results.json, written after its test, reads.
    Otherwise one line saying so, with the checkpoint to name to test it as it is."""
    have = [name for name in CHECKPOINTS if files.checkpoint_file(run_dir, name).is_file()]
    name = f"give {option.format(have[0])} to test the checkpoint it has now" if have else ""
    trainer = training_process(run_dir)
    if trainer is not None:
        wait = "wait for it to finish (it writes results.json after its test)"
        raise MetarunError(
            f"{run_dir} is still training ({trainer}); {wait}{', or ' + name if name else ''}"
        )
    if not have:
        return  # checkpoint_path says there is nothing to test, and how to train it
    results = files.results_file(run_dir)
    if not results.is_file():
        held = (
            "only checkpoints/last.pt"
            if have == ["last"]
            else "checkpoints/" + " and ".join(f"{c}.pt" for c in have)
        )
        how = f"failed ({failure})" if (failure := files.failed_with(run_dir)) else "stopped"
        raise MetarunError(
            f"{run_dir} has not finished: it {how} before its test (no results.json) with {held}; resume "
            f"it to the end (metarun ... hydra.run.dir={run_dir}, the overrides it started with) or {name}"
        )
    try:
        record = json.loads(results.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reason = " ".join(str(e).split())[:100] or type(e).__name__
        raise MetarunError(
            f"{results} is cut short or damaged ({reason}); give {option.format('best')} to test its "
            "best checkpoint anyway, or restore results.json from a copy of the run"
        ) from None


def training_process(run_dir: Path) -> Optional[str]:
    """'process PID on HOST' when a live process holds the run directory's lock (metarun.lock); else None."""
    try:
        check_run_dir_free(run_dir)
        return None
    except RunDirBusy:
        try:
            holder = files.lock_holder(run_dir)
            return f"process {holder['pid']} on {holder['host']}"
        except (OSError, ValueError, KeyError, TypeError):  # it is writing its name in just now
            return "another process"


def read_config(run_dir: Path) -> DictConfig:
    """The config the run trained with, on the schema, every interpolation resolved now: so keys
    that follow another (model.in_channels: ${dataset.channels}) keep the values the checkpoint was
    trained with when evaluation changes what they followed."""
    path = files.config_file(run_dir)
    if not path.is_file():
        if files.holds_training_files(run_dir):
            raise MetarunError(
                f"{run_dir} holds a run's files but no .hydra/config.yaml (the config it trained with); "
                "copy the run's .hydra/ folder back from a copy of the run, or train it again"
            )
        problem = "does not exist" if not run_dir.exists() else "holds no .hydra/config.yaml"
        raise MetarunError(
            f"{run_dir} {problem}; give the directory of a metarun run (outputs/<date>/<time>_...)"
        )
    cut_short = (
        f"{path} is cut short or damaged ({{}}); copy .hydra/config.yaml back from a copy of the run, "
        "or train it again"
    )
    try:
        text = path.read_text()
        saved = OmegaConf.create(text)
    except Exception as e:  # not text, not YAML (a file cut inside a line)
        raise MetarunError(cut_short.format(first_line(e))) from None
    if not isinstance(saved, DictConfig):
        raise not_a_config(path, ValueError("not a mapping"))
    # The trainer writes every key of the schema, the seed last, and a final newline: a file cut
    # short lacks some, and the schema would fill them with defaults the run never had. `logger` is
    # absent from runs older than it and from those with logger=[]; it never changes a result.
    missing = [
        f.name for f in dataclasses.fields(Config) if f.name not in saved and f.name != "logger"
    ]
    if missing or not text.endswith("\n"):
        raise MetarunError(
            cut_short.format(f"no {', '.join(missing)}" if missing else "no final newline")
        )
    try:
        check_resolves(saved)
        return OmegaConf.merge(
            OmegaConf.structured(Config), OmegaConf.to_container(saved, resolve=True)
        )
    except MetarunError:
        raise
    except Exception as e:  # keys the schema does not know, values of the wrong type
        raise not_a_config(path, e) from None


def not_a_config(path: Path, e: Exception) -> MetarunError:
    return MetarunError(
        f"{path} is not the config of a metarun run ({first_line(e)}); "
        "give the directory of a run that metarun wrote"
    )


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)[:120]


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
            raise MetarunError(
                f"{line}: metarun-eval tests one setting at a time; give one value and run it once per value"
            )
        if o.is_add() or o.is_force_add() or o.is_delete() or o.package is not None:
            raise MetarunError(
                f"{line}: evaluation only changes keys the run has; write it as {key}=VALUE"
            )
        allowed = key in CHANGEABLE_GROUPS if "." not in key else key.startswith(CHANGEABLE_KEYS)
        if not allowed:
            raise MetarunError(
                f"{line}: {key} cannot change when a run is tested again (the checkpoint was "
                f"trained with it); change only {CHANGEABLE}, or train a new run"
            )
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
        fix = (
            f"did you mean {parent_key}.{close[0]}?"
            if close
            else f"its {parent_key} has {', '.join(keys) or 'no keys'}"
        )
        raise MetarunError(f"{line}: this run's config has no {key}; {fix}")
    try:
        OmegaConf.update(cfg, key, override.value(), merge=True)
    except OmegaConfBaseException as e:
        reason = str(e).strip().splitlines()[0]
        current = OmegaConf.select(cfg, key)
        if isinstance(current, Enum):  # eval.normalization, device.type: name the choices
            raise MetarunError(
                f"{line}: {reason}; give {key} one of {', '.join(c.value for c in type(current))} "
                f"(it is {current.value} in this run)"
            ) from None
        raise MetarunError(
            f"{line}: {reason}; give {key} a value of its type (it is {current!r} in this run)"
        ) from None


def check_images_fit_model(cfg: DictConfig) -> None:
    """Another dataset's images must have the channels and size the run's model was built for."""
    for model_key, data_key in (("in_channels", "channels"), ("image_size", "image_size")):
        trained, given = (
            OmegaConf.select(cfg, f"model.{model_key}"),
            OmegaConf.select(cfg, f"dataset.{data_key}"),
        )
        if trained is not None and given is not None and trained != given:
            raise MetarunError(
                f"dataset.{data_key}={given} but this run's model takes images of {data_key}={trained}; "
                f"set dataset.{data_key}={trained} (the dataset converts its images)"
            )


def checkpoint_path(run_dir: Path, checkpoint: str, option: str = "checkpoint={}") -> Path:
    if checkpoint not in CHECKPOINTS:
        raise MetarunError(
            f"{option.format(checkpoint)} is not one of {', '.join(CHECKPOINTS)}; "
            f"give {option.format('best')} (the best validation) or {option.format('last')}"
        )
    path = files.checkpoint_file(run_dir, checkpoint)
    if not path.is_file():
        raise MetarunError(
            f"{run_dir} has no checkpoints/{checkpoint}.pt; "
            f"{checkpoint_fix(run_dir, checkpoint, 'train it first', option)}"
        )
    return path


def checkpoint_fix(
    run_dir: Path, checkpoint: str, train: str, option: str = "checkpoint={}"
) -> str:
    """'train it first or give checkpoint=last': the other checkpoint, where the run has it."""
    other = CHECKPOINTS[1 - CHECKPOINTS.index(checkpoint)]
    if files.checkpoint_file(run_dir, other).is_file():
        return f"{train} or give {option.format(other)}"
    return f"{train} (metarun ... hydra.run.dir={run_dir})"


def ensemble_members(run_dir: Path, top_k: int, option: str = "checkpoint={}") -> list[dict]:
    """The checkpoints eval.ensemble_top_k=`top_k` averages: the first `top_k` of the members
    last.pt lists, best first ({"step", "score"}); one line when the run kept none, or the files
    are gone."""
    last = files.checkpoint_file(run_dir, "last")
    state = load_checkpoint(last, fix=checkpoint_fix(run_dir, "last", "train it again", option))
    listed = state.get("top_k") or []
    if not listed:
        raise MetarunError(
            f"eval.ensemble_top_k={top_k}: {run_dir} kept no validation checkpoints to average (it "
            f"trained with eval.ensemble_top_k=1); test it with eval.ensemble_top_k=1, or train a "
            f"new run with eval.ensemble_top_k={top_k}"
        )
    members = listed[:top_k]
    for member in members:
        path = files.ensemble_member_file(run_dir, member["step"])
        if not path.is_file():
            raise MetarunError(
                f"{run_dir} has no {path.relative_to(run_dir)}, which last.pt lists among its "
                "best validations; restore it from a copy of the run, or test with "
                "eval.ensemble_top_k=1"
            )
    return members


def restore(learner: MetaLearner, state: dict[str, Any], path: Path) -> None:
    """Load the checkpoint's learner weights. A run trained with running batch-norm statistics may
    be tested without them (model.batch_norm=task); one trained without has none to test with."""
    weights = dict(state.get("learner") or {})
    expected = learner.state_dict().keys()
    missing, unexpected = expected - weights.keys(), weights.keys() - expected
    if missing and all(key.endswith(RUNNING_STATISTICS) for key in missing):
        raise MetarunError(
            "model.batch_norm=running needs running statistics, which this run did not keep (it "
            "trained with model.batch_norm=task); test it with model.batch_norm=task"
        )
    if unexpected and all(key.endswith(RUNNING_STATISTICS) for key in unexpected):
        weights = {key: value for key, value in weights.items() if key not in unexpected}
    try:
        learner.load_state_dict(weights)
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:200]
        raise MetarunError(
            f"{path} does not fit the learner this config builds ({reason}); sizes that follow the "
            "training data (Baseline's head over the training classes) need the run's own dataset"
        ) from None
