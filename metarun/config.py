"""The structured-config schema and the checks that run before anything touches a run directory.

Plain groups (episode, device, train, eval) are dataclasses: Hydra merges `conf/` onto them, so an
unknown key or a wrong type fails at composition. Groups that build an object through `_target_`
(algorithm, dataset, model, optimizer, scheduler) are checked against the signature of the class
they build, so a new algorithm needs no schema entry of its own.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass, field
from enum import Enum
from importlib.resources import files
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    InterpolationKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
)

from metarun.errors import MetarunError


class DeviceType(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class Amp(str, Enum):
    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


class Normalization(str, Enum):
    train = "train"
    target = "target"


@dataclass
class EpisodeConfig:
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 15
    meta_batch_size: int = 32


@dataclass
class DeviceConfig:
    type: DeviceType = DeviceType.auto
    amp: Amp = Amp.none


class TestCheckpoint(str, Enum):
    best = "best"
    last = "last"


@dataclass
class TrainConfig:
    steps: int = 3000
    # Length in epochs over the training images instead of steps, for learners that train on single
    # images (algorithm=pretrain); then val_every and the scheduler count epochs too.
    epochs: Optional[int] = None
    # Images per step of those learners (episodic learners: episode.meta_batch_size tasks).
    batch_size: int = 64
    val_every: int = 500
    val_episodes: int = 200
    log_every: int = 25
    # Clip the meta-gradient's global norm to this (torch.nn.utils.clip_grad_norm_); None: no clipping.
    grad_clip: Optional[float] = None
    # The checkpoint the final test scores: best (best validation) or last (RFS and Meta-Baseline
    # test their last epoch).
    test_checkpoint: TestCheckpoint = TestCheckpoint.best


@dataclass
class EvalConfig:
    episodes: int = 600
    seed: int = 0
    batch_size: int = 50
    # Validation and test episodes: a conf/episode/ name (eval.episode=20w1s), else the training
    # episode's; single keys override either (papers often train with more ways or fewer queries
    # than they test with).
    episode: Optional[str] = None
    n_way: int = "${eval_episode:${eval.episode},n_way,${episode.n_way}}"  # type: ignore[assignment]
    k_shot: int = "${eval_episode:${eval.episode},k_shot,${episode.k_shot}}"  # type: ignore[assignment]
    n_query: int = "${eval_episode:${eval.episode},n_query,${episode.n_query}}"  # type: ignore[assignment]
    # M augmented copies of each support image at validation and test time (the augment group's
    # settings, or the dataset's standard augmentation with augment=none); 0: none.
    support_augment: int = 0
    # Another dataset's images (metarun-eval RUN dataset=...) are normalized with the mean and std of
    # the dataset the run trained on (train; Chen et al., 2019's cross-domain protocol), or their own (target).
    normalization: Normalization = Normalization.train
    # Test with another head on the same episodes (conf/head/NAME.yaml; metarun.heads), its keys
    # replaced by head_options; null: the learner's own classifier.
    head: Optional[str] = None
    head_options: Dict[str, Any] = field(default_factory=dict)
    # Training images whose mean embedding a run keeps for the heads that need it (SimpleShot),
    # drawn with eval.seed; null: all of them.
    base_images: Optional[int] = 2000
    # Test the K best validation checkpoints together (MAML++: Antoniou et al., 2019): each test
    # episode's query class probabilities are averaged over the K models; 1: the one checkpoint.
    ensemble_top_k: int = 1


@dataclass
class Config:
    algorithm: Any = None
    dataset: Any = None
    model: Any = None
    optimizer: Any = None
    scheduler: Optional[Any] = None
    augment: Optional[Any] = None
    head: Optional[Any] = None  # the head an embedding learner trains through (conf/head/)
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    logger: Optional[Any] = None  # where the records go besides metrics.jsonl (conf/logger/)


ConfigStore.instance().store(name="metarun_schema", node=Config)


def eval_episode(name: Optional[str], key: str, default: int) -> int:
    """`key` of conf/episode/<name>.yaml, or `default` (the training episode's) when name is null."""
    if name is None:
        return default
    episodes = files("metarun.conf") / "episode"
    path = episodes / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(
            p.name.removesuffix(".yaml") for p in episodes.iterdir() if p.name.endswith(".yaml")
        )
        raise MetarunError(
            f"eval.episode={name} is not in conf/episode/; choose one of: {', '.join(choices)}"
        )
    return OmegaConf.create(path.read_text())[key]


OmegaConf.register_new_resolver("eval_episode", eval_episode, replace=True)


def schedule_length(epochs: Optional[int], steps: int) -> int:
    """The run's length in the units the scheduler is stepped in: epochs when train.epochs is set,
    else steps."""
    return steps if epochs is None else epochs


OmegaConf.register_new_resolver("schedule_length", schedule_length, replace=True)


def required(key: str, what: str) -> Any:
    """`${required:model.init,the classifier stage's run directory}`: a value an experiment cannot
    run without and only the user can give (`???` cannot replace a group's default)."""
    raise MetarunError(f"{key} must be given: {what}; pass {key}=<it> on the command line")


OmegaConf.register_new_resolver("required", required, replace=True)

# Keys that must be positive; the algorithm checks its own (inner_lr, adaptation_steps, ...).
POSITIVE = (
    "episode.n_way",
    "episode.k_shot",
    "episode.n_query",
    "episode.meta_batch_size",
    "train.steps",
    "train.epochs",
    "train.batch_size",
    "train.val_every",
    "train.val_episodes",
    "train.log_every",
    "train.grad_clip",
    "eval.episodes",
    "eval.batch_size",
    "eval.n_way",
    "eval.k_shot",
    "eval.n_query",
    "optimizer.lr",
    "eval.base_images",
    "eval.ensemble_top_k",
)
NON_NEGATIVE = ("eval.support_augment",)
TARGET_GROUPS = ("algorithm", "dataset", "model", "optimizer", "scheduler", "augment", "head")
# Arguments the trainer passes itself rather than the config; an algorithm receives
# n_train_classes (the training split's class count) only if its constructor names it.
PASSED_BY_TRAINER = {
    "algorithm": {"model", "n_way", "n_train_classes", "head"},
    "optimizer": {"params"},
    "scheduler": {"optimizer"},
}
# Keys of a group that metarun reads itself and does not pass to the group's target.
OWN_KEYS = {"model": ("init",), "algorithm": ("task_workers",)}


def validate(cfg: DictConfig) -> None:
    """Raise MetarunError (one line, with the fix) for any value the run could not start with."""
    check_resolves(cfg)
    for keys, words, wanted in ((POSITIVE, "positive", "> 0"), (NON_NEGATIVE, "0 or more", ">= 0")):
        for key in keys:
            value = OmegaConf.select(cfg, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MetarunError(
                    f"{key}={value!r} should be a number; pass {key}=<a number {wanted}>"
                )
            if value < 0 or (value == 0 and wanted == "> 0"):
                raise MetarunError(f"{key}={value} must be {words}; pass {key}=<a value {wanted}>")
    for group in TARGET_GROUPS:
        node = cfg.get(group)
        if node:  # augment=none is an empty node
            check_target_arguments(group, node)


def check_resolves(cfg: DictConfig) -> None:
    """Every interpolation resolves and every mandatory value (`???`) is set."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except InterpolationKeyError as e:
        # A group that follows another, e.g. model.in_channels: ${dataset.channels} with a dataset that has none.
        missing = str(e).split("'")[1] if str(e).count("'") >= 2 else "a key"
        raise MetarunError(
            f"{e.full_key} follows {missing}, which this config does not set; choose a "
            f"{e.full_key.split('.')[0]} that fits the {missing.split('.')[0]} (e.g. dataset=sinusoid "
            "takes model=mlp) or set it"
        ) from None
    except InterpolationResolutionError as e:
        # OmegaConf rewraps a resolver's exception; keep our own message without its prefix.
        message = (
            str(e)
            .splitlines()[0]
            .removeprefix(f"{MetarunError.__name__} raised while resolving interpolation: ")
        )
        raise MetarunError(message) from None
    except MissingMandatoryValue as e:
        raise MetarunError(
            f"{e.full_key} must be set; pass {e.full_key}=<value> (metarun --cfg job shows the config)"
        ) from None


def check_target_arguments(group: str, node: DictConfig) -> None:
    """Every key of a `_target_` group must be an argument of the target, of the annotated type."""
    if "_target_" not in node:
        raise MetarunError(
            f"{group} has no _target_; choose a {group} from conf/{group}/ (metarun --help lists them)"
        )
    target = get_object(node._target_)
    signature = inspect.signature(target)
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    names = [n for n in signature.parameters if n not in PASSED_BY_TRAINER.get(group, ())]
    hints = _type_hints(target)
    for key, value in node.items():
        if key.startswith("_") or key in OWN_KEYS.get(group, ()):
            continue
        if key not in signature.parameters:
            if accepts_kwargs:
                continue
            close = difflib.get_close_matches(key, names, n=1)
            hint = (
                f"did you mean {group}.{close[0]}?" if close else f"valid keys: {', '.join(names)}"
            )
            raise MetarunError(f"{group}.{key} is not a parameter of {node._target_}; {hint}")
        expected = hints.get(key)
        if expected in (int, float, bool, str) and not _is_instance(value, expected):
            name = expected.__name__
            raise MetarunError(
                f"{group}.{key}={value!r} should be {'an' if name == 'int' else 'a'} {name}; pass {group}.{key}=<{name}>"
            )


def _type_hints(target: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except (
        Exception
    ):  # targets from other libraries may have hints we cannot resolve; skip the type check
        return {}


def _is_instance(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def accepted_arguments(node: DictConfig, offered: dict[str, Any]) -> dict[str, Any]:
    """The `offered` arguments that the target of `node` takes (all, if it takes **kwargs)."""
    parameters = inspect.signature(get_object(node._target_)).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return offered
    return {name: value for name, value in offered.items() if name in parameters}


# -- helpers over a composed config ----------------------------------------------------------
# Keys a resumed run may change: how long it trains, how it is evaluated, where it runs (the task
# workers too: the same sums on any count), where it logs; and the dataset's machine-local keys
# (where it reads from), which the dataset declares.
RESUMABLE_CHANGES = (
    "train.steps",
    "train.epochs",
    "eval.",
    "device.",
    "logger",
    "algorithm.task_workers",
)
# The eval.* keys that change the validation episodes (which tasks, their shape, the support copies)
# and so the scores best_val compares; a resumed run that changes one re-validates best.pt. The
# others change only the test (eval.episodes) or the speed (eval.batch_size: each task is scored on
# its own); eval.episode is read through the n_way, k_shot and n_query it sets.
VALIDATION_KEYS = ("seed", "n_way", "k_shot", "n_query", "support_augment")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with our own one-line errors unwrapped from Hydra's."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, MetarunError):
            raise cause from None
        raise MetarunError(str(e).splitlines()[0]) from e


def target_node(cfg: DictConfig, group: str) -> DictConfig:
    """A group as its target takes it: resolved, without the keys metarun reads itself (OWN_KEYS:
    model.init, algorithm.task_workers)."""
    node = OmegaConf.to_container(cfg[group], resolve=True)
    return OmegaConf.create({k: v for k, v in node.items() if k not in OWN_KEYS.get(group, ())})


def episode_key(cfg: DictConfig, part: str) -> str:
    """The config node that sets `part`'s episodes: eval.* once it differs from episode.*."""
    differs = any(cfg.eval[key] != cfg.episode[key] for key in ("n_way", "k_shot", "n_query"))
    return "eval" if part != "train" and differs else "episode"


def episode_shape(cfg: DictConfig, part: str) -> tuple[int, int, int]:
    """(n_way, k_shot, n_query) of `part`'s episodes."""
    node = cfg[episode_key(cfg, part)]
    return node.n_way, node.k_shot, node.n_query


def config_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(
    old: dict[str, Any], new: dict[str, Any], also_allowed: tuple[str, ...] = ()
) -> list[str]:
    """Keys whose values differ between two configs, except those a resumed run may change."""
    old, new = flatten(old), flatten(new)
    allowed = RESUMABLE_CHANGES + also_allowed
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not key.startswith(allowed)
    ]


def validation_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The VALIDATION_KEYS whose values differ between two configs, as "eval.KEY: OLD -> NEW"."""
    old_eval, new_eval = old.get("eval", {}), new.get("eval", {})
    return [
        f"eval.{key}: {old_eval.get(key)!r} -> {new_eval.get(key)!r}"
        for key in VALIDATION_KEYS
        if old_eval.get(key) != new_eval.get(key)
    ]


def hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run's hyperparameters as TensorBoard wants them: flat, scalar values only."""
    flat = flatten(config_container(cfg))
    return {
        k: v
        for k, v in flat.items()
        if isinstance(v, (int, float, str, bool))
        and not k.startswith(("dataset.root", "dataset.path"))
    }
