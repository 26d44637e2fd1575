"""The paper experiments of conf/experiment/: every one composes and validates, and every one on natural
images builds a Trainer on its dataset's fixture and takes a training step with the paper's algorithm,
backbone, batch-norm mode and optimizer.

The experiments are read from the config folder, so a new one is covered without editing this file.
The real mini-ImageNet and CIFAR images are not needed: the fixtures (tests/conftest.py) stand in.
"""

from __future__ import annotations

from importlib.resources import files

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from metarun.config import flatten, validate
from metarun.trainer import Trainer
from tests.conftest import COLOUR_DATASETS, compose_config

EXPERIMENT_DIR = files("metarun.conf") / "experiment"
EXPERIMENTS = sorted(
    p.name.removesuffix(".yaml") for p in EXPERIMENT_DIR.iterdir() if p.name.endswith(".yaml")
)


def experiment_dataset(name: str) -> str | None:
    """The dataset an experiment's defaults list switches to (`override /dataset: NAME`), directly or
    through the experiment it builds on (a plain entry naming another), or None."""
    defaults = yaml.safe_load((EXPERIMENT_DIR / f"{name}.yaml").read_text()).get("defaults") or []
    for entry in defaults:  # its own override comes before its parent's dataset
        if isinstance(entry, dict) and "override /dataset" in entry:
            return entry["override /dataset"]
    for entry in defaults:
        if isinstance(entry, str) and entry != "_self_":
            return experiment_dataset(entry)
    return None


# (experiment, dataset) for every experiment on a dataset that has a test fixture.
NATURAL_IMAGES = [
    (name, experiment_dataset(name))
    for name in EXPERIMENTS
    if experiment_dataset(name) in COLOUR_DATASETS
]


def test_the_natural_image_experiments_are_found():
    assert {dataset for _, dataset in NATURAL_IMAGES} == {"miniimagenet", "cifarfs", "fc100"}


def given(name: str) -> list[str]:
    """Overrides for the values an experiment needs from its user (`${required:KEY,...}`: the run
    it starts from or distils), set to null: a run from scratch."""
    raw = flatten(OmegaConf.to_container(compose_config(f"+experiment={name}"), resolve=False))
    return [f"{k}=null" for k, v in raw.items() if str(v).startswith("${required:")]


def test_experiments_that_start_from_another_run_say_so_until_it_is_given(capsys):
    from metarun.errors import MetarunError

    assert given("metabaseline_miniimagenet") == ["model.init=null"]
    assert given("rfs_miniimagenet_distill") == ["algorithm.teacher=null"]
    with pytest.raises(MetarunError, match="model.init must be given: the run directory of the "):
        validate(compose_config("+experiment=metabaseline_miniimagenet"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    validate(compose_config(f"+experiment={name}", *given(name)))


def fixture_sized(own) -> list[str]:
    """Overrides that shrink an experiment to the fixtures (5 val/test classes of 8 images, 16x16):
    at most 5 ways and 5 shots, 1 query, 2 tasks, 1 step, 2 evaluation episodes, a narrow ResNet-12."""
    size = [
        f"episode.n_way={min(own.episode.n_way, 5)}",
        f"episode.k_shot={min(own.episode.k_shot, 5)}",
        "episode.n_query=1",
        f"episode.meta_batch_size={min(own.episode.meta_batch_size, 2)}",
        "train.steps=1",
        "train.val_episodes=2",
        "eval.n_way=5",
        "eval.n_query=1",
        "eval.episodes=2",
        "eval.batch_size=2",
    ]
    if own.model._target_.endswith("ResNet12"):
        size.append("model.channels=[8,8,16,16]")
    if own.model._target_.endswith("TimmBackbone"):
        size.append("model.name=test_vit")  # timm's tiny ViT in place of ViT-S/16
    if "warmup" in (own.scheduler or {}):
        size.append("scheduler.warmup=0")  # a warm-up longer than the one step
    if own.device.amp.value == "fp16":
        size.append("device.amp=none")  # fp16 autocast needs a GPU
    return size


@pytest.fixture
def one_thread():
    """One intra-op thread for these tiny steps: on a busy 2-core machine a second one mostly waits
    (MAML's step measured 0.5 s with one thread, 7 s with two beside other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name, dataset", NATURAL_IMAGES)
def test_every_natural_image_experiment_takes_a_training_step_on_its_fixture(
    make_config, colour_datasets, one_thread, tmp_path, name, dataset
):
    own = compose_config(f"+experiment={name}", *given(name))
    cfg = make_config(f"+experiment={name}", *given(name), *fixture_sized(own), dataset=dataset)
    # The experiment's `override /dataset` keeps the fixture's folder, cache and image size.
    for override in colour_datasets[dataset]:
        key, value = override.split("=", 1)
        if key.startswith("dataset."):
            assert OmegaConf.select(cfg, key) == yaml.safe_load(value), key
    assert cfg.dataset._target_ == own.dataset._target_
    # ... and keeps what makes it the paper's run.
    sized = {override.split("=")[0] for override in fixture_sized(own)}
    unresolved = lambda c, group: {
        f"{group}.{k}": v
        for k, v in flatten(
            OmegaConf.to_container(c[group], resolve=False) if c[group] else {}
        ).items()
        if f"{group}.{k}" not in sized
    }
    for group in ("algorithm", "head", "optimizer", "scheduler", "augment"):
        assert unresolved(cfg, group) == unresolved(own, group), group
    for key in ("_target_", "batch_norm", "hidden", "drop_rate", "dropblock_size"):
        assert cfg.model.get(key) == own.model.get(key), f"model.{key}"

    trainer = Trainer(cfg, tmp_path)
    loss = trainer.train_step(trainer.training_batch())["loss"]
    assert torch.isfinite(loss), loss


def test_metaoptnet_protonet_experiments_scale_their_distances_as_the_code_does():
    # Without the scaling, SGD at lr 0.1 on ResNet-12's squared distances diverges (seed 0 on the FC100
    # fixture: losses 1.1e3 ... 2.0e4 in eight steps, against 1.5 ... 0.3 with it).
    for name in (
        "protonet_resnet12_miniimagenet_5w1s",
        "protonet_resnet12_miniimagenet_5w5s",
        "protonet_fc100_5w1s",
    ):
        algorithm = compose_config(f"+experiment={name}").algorithm
        assert algorithm.normalize_distance and algorithm.learn_scale, name


def test_maml_family_experiments_claiming_mamls_settings_take_its_inner_loss_and_network():
    # MAML's code applies its inner_lr to N x the mean support loss (inner_loss=sum_over_k) and on
    # Omniglot downsamples by stride-2 convs; on mini-ImageNet it max-pools.
    for name, downsample in (
        ("maml_omniglot_5w1s", "stride"),
        ("anil_omniglot_5w1s", "stride"),
        ("maml_miniimagenet_5w1s", "pool"),
        ("maml_miniimagenet_5w5s", "pool"),
    ):
        cfg = compose_config(f"+experiment={name}")
        assert (cfg.algorithm.inner_loss, cfg.model.downsample) == ("sum_over_k", downsample), name
    paper = compose_config("+experiment=maml_omniglot_5w1s")
    assert (
        paper.algorithm.inner_lr,
        paper.algorithm.adaptation_steps,
        paper.episode.meta_batch_size,
    ) == (0.4, 1, 32)
    # The algorithm's own defaults keep the mean loss and max-pooling: earlier results stand.
    default = compose_config("algorithm=maml")
    assert (default.algorithm.inner_loss, default.model.downsample) == ("mean", "pool")
