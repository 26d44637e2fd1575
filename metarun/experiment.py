"""The parts of one run, built and checked from its config once: device, AMP, dataset, score, the
episodes of each part, and the learner.

Training (`metarun.trainer.Trainer`) adds what only training needs: an optimizer, a scheduler, a
gradient scaler, the task generator and resume. Testing a trained run again (`metarun-eval`),
`metarun.load` and `metarun-data` build an `Experiment` alone. Building one reads the dataset and
makes the learner with freshly initialized weights; it writes nothing.

The order of the draws from torch's generator is part of a run's numbers: the dataset and the
samplers first, then `torch.manual_seed(cfg.seed)` and the model, as every run has made them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Optional, Sequence, Union

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from metarun.algorithms.base import MetaLearner
from metarun.config import (
    accepted_arguments,
    build,
    episode_key,
    episode_shape,
    target_node,
    validate,
)
from metarun.data.augment import Augment
from metarun.data.batches import ImageBatches
from metarun.data.contract import PARTS, TaskDataset, TaskSource
from metarun.data.sampler import EpisodeSampler, normalization
from metarun.device import autocast, check_amp, keep_freed_memory, resolve_device
from metarun.distributed import Processes
from metarun.errors import MetarunError
from metarun.evaluation import evaluate
from metarun.heads.base import Head
from metarun.heads.base_statistics import base_statistics
from metarun.heads.named import named_head
from metarun.heads.testing import HeadTest
from metarun.score import ACCURACY, Score
from metarun.task_workers import resolve_task_workers

Sampler = Union[EpisodeSampler, TaskSource, ImageBatches]


class Experiment:
    """`Experiment(cfg)`: the parts of the run `cfg` describes, with episodes of `parts` only (a
    trained run tested again needs "test" alone, so a dataset too small for the training
    episodes can still be tested on; `metarun.load` needs none)."""

    def __init__(self, cfg: DictConfig, parts: Sequence[str] = PARTS):
        validate(cfg)
        self.cfg = cfg
        self.device = resolve_device(cfg.device.type.value)
        self.amp = cfg.device.amp.value
        check_amp(self.device, self.amp)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.dataset = dataset = build(cfg.dataset)
        self.score: Score = dataset.score if isinstance(dataset, TaskDataset) else ACCURACY
        check_algorithm_learns(cfg.algorithm, dataset, self.score)
        self.trains_on = check_length_unit(cfg)
        augment = build(cfg.augment).resolve(dataset.standard_augment) if cfg.augment else None
        self.augment: Optional[Augment] = augment
        self.samplers: dict[str, Sampler] = {part: self.episode_sampler(part) for part in parts}
        torch.manual_seed(cfg.seed)
        model = build(target_node(cfg, "model"))
        check_model_input(model, dataset)
        # A pretrained backbone takes its images normalized as in its pretraining (timm's).
        own = getattr(dataset, "mean", None), getattr(dataset, "std", None)
        self.mean, self.std = getattr(model, "input_normalization", own)
        for sampler in self.samplers.values():
            if hasattr(sampler, "mean_std"):
                sampler.mean_std = normalization(self.mean, self.std)
        offered = {
            "model": model,
            "n_way": cfg.episode.n_way,
            "n_train_classes": dataset.n_classes("train"),
            "head": build(cfg.head) if cfg.head else None,
        }
        arguments = accepted_arguments(cfg.algorithm, offered)
        if cfg.head and "head" not in arguments:
            raise MetarunError(
                f"head={cfg.head._target_.rsplit('.', 1)[-1]}: {algorithm_name(cfg)} does not train "
                "through a head (algorithm=protonet does); test it with one instead: eval.head=NAME"
            )
        self.learner: MetaLearner = build(target_node(cfg, "algorithm"), **arguments).to(
            self.device
        )
        self.learner.task_workers = resolve_task_workers(
            cfg.algorithm.get("task_workers", 1), self.learner, self.device
        )
        self.learner.check_n_way(cfg.eval.n_way)
        # What the test episodes are scored with: the learner, or its embeddings and eval.head.
        self.test_head: Optional[Head] = None
        self.tester: Union[MetaLearner, HeadTest] = self.learner
        if cfg.eval.head and self.score is not ACCURACY:
            raise MetarunError(
                f"eval.head={cfg.eval.head} classifies, and {dataset.name}'s tasks are regression; "
                "drop eval.head"
            )
        if cfg.eval.head:
            self.test_head = named_head(cfg.eval.head, cfg.eval.head_options).to(self.device)
            self.tester = HeadTest(self.learner, self.test_head, algorithm_name(cfg))

    def episode_sampler(self, part: str) -> Sampler:
        """`part`'s episodes on the device, normalized as the dataset declares; training episodes
        augmented by the augment group, evaluation ones given eval.support_augment copies. A task
        dataset (sinusoid) draws its own (`TaskDataset.tasks`). A learner that trains on single
        images gets the training part as shuffled batches of them (metarun.data.batches)."""
        dataset, cfg = self.dataset, self.cfg
        shape, key = episode_shape(cfg, part), episode_key(cfg, part)
        if isinstance(dataset, TaskDataset):
            return dataset.tasks(part, *shape, key, self.device)
        if part == "train" and self.trains_on == "images":
            return ImageBatches(
                dataset.part(part).to(self.device),
                cfg.train.batch_size,
                cfg.seed,
                dataset.mean,
                dataset.std,
                self.augment,
            )
        copies = 0 if part == "train" else cfg.eval.support_augment
        augment = self.support_copies_augment() if copies else self.augment
        return EpisodeSampler(
            dataset.part(part).to(self.device),
            *shape,
            part,
            dataset.name,
            config_key=key,
            mean=dataset.mean,
            std=dataset.std,
            augment=augment if part == "train" or copies else None,
            support_copies=copies,
        )

    def support_copies_augment(self) -> Augment:
        """What draws eval.support_augment's copies: the augment group's augmentation, or with
        augment=none the dataset's standard one."""
        return self.augment or Augment().resolve(self.dataset.standard_augment)

    def autocast(self) -> AbstractContextManager:
        return autocast(self.device, self.amp)

    def evaluate(
        self, part: str, episodes: int, processes: Processes = Processes()
    ) -> dict[str, Any]:
        """The learner's loss and score over `part`'s fixed episodes 0..episodes-1 (eval.seed)."""
        cfg = self.cfg.eval
        sampler = self.samplers[part]
        return evaluate(
            self.tester if part == "test" else self.learner,
            sampler,
            episodes,
            cfg.seed,
            cfg.batch_size,
            self.autocast,
            score=self.score,
            processes=processes,
        )

    # -- the head the test is scored with ----------------------------------------------------------
    def head_entries(self) -> dict[str, Any]:
        """What results.json says about the test's classifier: its head's name, and whether each
        query's prediction used the other queries (a transductive head, or batch norm over the
        episode: model.batch_norm=task)."""
        head = self.test_head or getattr(self.learner, "head", None)
        transductive = bool(getattr(head, "transductive", False))
        batch_norm = OmegaConf.select(self.cfg, "model.batch_norm", default="none")
        return {
            "head": self.test_head.name if self.test_head else self.learner.default_head,
            "transductive": transductive or batch_norm == "task",
        }

    def heads_needing_base_statistics(self) -> list[Head]:
        heads = (self.test_head, getattr(self.learner, "head", None))
        return [h for h in heads if isinstance(h, Head) and h.base_statistics]

    def base_statistics(self) -> Optional[dict[str, torch.Tensor]]:
        """The training images' mean embedding with the learner's weights now (eval.base_images of
        them), for a class dataset's embedding learner; None otherwise."""
        if not self.learner.embeds or isinstance(self.dataset, TaskDataset):
            return None
        return base_statistics(
            self.learner,
            self.dataset.part("train"),
            normalization(self.mean, self.std),
            self.cfg.eval.base_images,
            self.cfg.eval.seed,
            self.autocast(),
        )

    def give_base_statistics(self, statistics: Optional[dict[str, torch.Tensor]], where: str):
        """Hand the heads that need them the statistics a checkpoint keeps; one line if it keeps
        none (a run trained before metarun stored them)."""
        for head in self.heads_needing_base_statistics():
            if statistics is None:
                raise MetarunError(
                    f"head={head.name} needs the training classes' mean embedding, which {where} "
                    "does not keep (it was trained before metarun stored it, or its learner has no "
                    "embedding); train the run again, or test it with a head that needs none"
                )
            head.set_base_statistics({k: v.to(self.device) for k, v in statistics.items()})


def algorithm_name(cfg: DictConfig) -> str:
    """`algorithm=protonet` as the command line would choose it (its target's class otherwise)."""
    choice = None
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("algorithm")
    return f"algorithm={choice}" if choice else cfg.algorithm._target_.rsplit(".", 1)[-1]


def check_length_unit(cfg: DictConfig) -> str:
    """What the learner trains on ("episodes" or "images"); train.epochs counts passes over the
    training images, which only a learner that trains on single images makes."""
    trains_on = get_object(cfg.algorithm._target_).trains_on
    epochs = cfg.train.epochs
    if epochs is not None and trains_on != "images":
        raise MetarunError(
            f"train.epochs={epochs}, but {algorithm_name(cfg)} trains on episodes, which have no "
            "epochs; set its length in train.steps, or train with algorithm=pretrain"
        )
    if epochs is not None and cfg.train.val_every > epochs:
        raise MetarunError(
            f"train.val_every={cfg.train.val_every} counts epochs when train.epochs is set, and "
            f"the run has {epochs}; set train.val_every=1 (validate after every epoch) or up to {epochs}"
        )
    return trains_on


def check_model_input(model: torch.nn.Module, dataset: Any) -> None:
    """A backbone that declares its input (in_shape) must take the dataset's items."""
    have, wanted = getattr(model, "in_shape", None), tuple(dataset.input_shape)
    if have is None or tuple(have) == wanted:
        return
    if len(have) != len(wanted):
        fits = "model=mlp" if len(wanted) == 1 else "model=conv4, resnet12 or resnet18"
        raise MetarunError(
            f"{type(model).__name__} takes inputs of shape {tuple(have)} but {dataset.name}'s items "
            f"have shape {wanted}; use a backbone for them: {fits}"
        )
    for key, source, index in (("in_channels", "channels", 0), ("image_size", "image_size", -1)):
        if have[index] != wanted[index]:
            raise MetarunError(
                f"model.{key}={have[index]} but {dataset.name}'s images have {source}={wanted[index]}; "
                f"set model.{key}=${{dataset.{source}}} (the default) or dataset.{source}={have[index]}"
            )


def check_algorithm_learns(node: DictConfig, dataset: Any, score: Score) -> None:
    """A regression dataset needs a learner that learns regression (a one-line error otherwise)."""
    if score is not ACCURACY and not get_object(node._target_).regression:
        raise MetarunError(
            f"{node._target_.rsplit('.', 1)[-1]} classifies and cannot learn {dataset.name}'s "
            "regression tasks; use algorithm=maml, fomaml, metasgd, anil or reptile"
        )
