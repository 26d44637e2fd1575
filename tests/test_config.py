import inspect
import math
import subprocess
import sys
from importlib.resources import files

import pytest
import torch
from hydra.utils import get_object

from metarun.config import PASSED_BY_TRAINER, validate
from metarun.errors import MetarunError
from tests.conftest import compose_config, one_line_error


def metarun(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metarun.commands.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_default_config_validates():
    validate(compose_config())


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=-0.1", r"optimizer.lr=-0.1 must be positive"),
        ("train.steps=0", r"train.steps=0 must be positive"),
        (
            "+algorithm.inner_lrr=0.1",
            r"algorithm.inner_lrr is not a parameter .*MAML; did you mean algorithm.inner_lr\?",
        ),
        ("algorithm.inner_lr=fast", r"algorithm.inner_lr='fast' should be a float"),
        ("algorithm.adaptation_steps=1.5", r"algorithm.adaptation_steps=1.5 should be an int"),
        (
            "optimizer.lr=abc",
            r"optimizer.lr='abc' should be a number; pass optimizer.lr=<a number > 0>",
        ),
        ("eval.support_augment=-1", r"eval.support_augment=-1 must be 0 or more"),
        ("dataset=folder", r"dataset.path must be set; pass dataset.path=<value>"),
    ],
)
def test_invalid_values_are_one_line_errors(override, message):
    overrides = ["algorithm=maml", override] if "algorithm" in override else [override]
    with pytest.raises(MetarunError, match=message) as error:
        validate(compose_config(*overrides))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key train.stepz; did you mean train.steps?"),
        ("algorithm=mamll", "Could not find 'algorithm/mamll'; choose one of: "),
        ("dataset=omniglott", "choose one of: cifarfs, fc100, folder, miniimagenet, omniglot"),
        ("episode.n_way=five", "episode.n_way: Value 'five'"),
        ("device.amp=fp32", "expected one of [none, bf16, fp16]"),
        (
            "augment=strong",
            "Could not find 'augment/strong'; choose one of: metabaseline, none, rfs, standard",
        ),
    ],
)
def test_cli_composition_errors_are_one_line_with_exit_2(override, message, tmp_path):
    result = metarun(override, "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_prints_composed_config_from_any_directory(tmp_path):
    result = metarun("algorithm=maml", "episode=20w5s", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "_target_: metarun.algorithms.maml.MAML" in result.stdout
    assert "n_way: 20" in result.stdout and "k_shot: 5" in result.stdout


def test_eval_episode_names_a_test_episode_config_and_single_keys_override_it():
    cfg = compose_config("episode=5w1s", "eval.episode=20w1s")
    assert (cfg.eval.n_way, cfg.eval.k_shot, cfg.eval.n_query) == (20, 1, 15)
    assert cfg.episode.n_way == 5
    cfg = compose_config("eval.episode=20w5s", "eval.n_query=5")
    assert (cfg.eval.n_way, cfg.eval.k_shot, cfg.eval.n_query) == (20, 5, 5)
    cfg = compose_config("episode=20w5s")  # unset: the training episode's
    assert (cfg.eval.n_way, cfg.eval.k_shot, cfg.eval.n_query) == (20, 5, 15)


def test_unknown_eval_episode_lists_the_choices(tmp_path):
    with pytest.raises(
        MetarunError,
        match=r"^eval.episode=20w2s is not in conf/episode/; choose one of: 20w1s, 20w5s, 5w1s, 5w5s$",
    ):
        validate(compose_config("eval.episode=20w2s"))
    result = metarun("eval.episode=20w2s", f"hydra.run.dir={tmp_path}/run", "device=cpu")
    assert result.returncode == 2 and "eval.episode=20w2s is not in conf/episode/" in result.stderr
    assert not (tmp_path / "run").exists()


def test_trainer_arguments_reach_only_the_algorithms_that_take_them():
    from omegaconf import OmegaConf

    from metarun.config import accepted_arguments

    offered = {"model": "m", "n_way": 5, "n_train_classes": 4112}
    maml = OmegaConf.create({"_target_": "metarun.algorithms.maml.MAML"})
    assert accepted_arguments(maml, offered) == {"model": "m", "n_way": 5}
    takes_any = OmegaConf.create({"_target_": "argparse.Namespace"})
    assert accepted_arguments(takes_any, offered) == offered


ALGORITHMS = sorted(
    p.name.removesuffix(".yaml")
    for p in (files("metarun.conf") / "algorithm").iterdir()
    if p.name.endswith(".yaml")
)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_yaml_lists_every_hyperparameter_its_learner_takes(name):
    # A default only in code is a hyperparameter no config, log or results.json shows (MANN's
    # key_strength was one); the trainer passes model, n_way and n_train_classes itself.
    node = compose_config(f"algorithm={name}").algorithm
    signature = inspect.signature(get_object(node._target_))
    hidden = [
        key
        for key, p in signature.parameters.items()
        if p.default is not p.empty
        and key not in PASSED_BY_TRAINER["algorithm"]
        and key not in node
    ]
    assert hidden == [], f"conf/algorithm/{name}.yaml does not list {', '.join(hidden)}"


def test_warmup_cosine_rises_linearly_then_follows_the_cosine_to_its_minimum():
    from metarun.schedules import warmup_cosine

    lrs = []
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup=4, total=12, start_factor=0.2, eta_min=0.1)
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    cosine = [0.1 + 0.9 * (1 + math.cos(math.pi * i / 8)) / 2 for i in range(8)]
    assert lrs[4:] == pytest.approx(cosine)
    assert "scheduler.warmup=12 must be" in one_line_error(
        lambda: warmup_cosine(optimizer, warmup=12, total=12)
    )


def test_the_cosine_schedule_spans_the_run_in_its_unit():
    assert compose_config("scheduler=cosine").scheduler.T_max == 3000  # train.steps
    epochs = compose_config("scheduler=cosine", "train.epochs=7", "train.val_every=1")
    assert epochs.scheduler.T_max == 7
