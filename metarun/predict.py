"""A trained run adapted to your own few-shot task: `metarun.load` in Python, `metarun-predict` on the CLI.

    model = metarun.load(RUN_DIR)                   # a finished run's tested checkpoint; checkpoint="last", device="cpu"
    task = model.adapt(support_images, support_labels)  # labels: any hashable names
    task.predict(query_images)                      # -> those names
    task.predict_proba(query_images)                # -> [M, N] probabilities, columns in task.classes

Images are file paths, PIL images or tensors. Files and PIL images are decoded as the run's dataset
decodes its own (`ClassDataset.decode`: channels, size, Omniglot's inversion); a tensor is an image
as the dataset holds it after decoding, uint8 `[C, S, S]` or float in [0, 1] (a batch: `[M, C, S, S]`).
Then, as the episode sampler does, pixels are scaled to [0, 1] and normalized with the mean and std
the model trained with. The learner is built as the run built it (metarun.saved_run), in evaluation mode, and
adapts with the run's evaluation settings: the gradient-based ones take `eval_adaptation_steps`
inner steps, and a run tested with `eval.support_augment=M` adapts to each support image followed
by M augmented copies, as its test episodes hold them. Predictions follow the run's batch-norm mode:
with `task` the queries of one call are normalized together, as in the run's own test. Loading
leaves the caller's random state as it was.

`metarun-predict` (metarun.commands.predict) does the same for folders of images on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Hashable, Iterable, Optional, Union

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2.functional import normalize

from metarun.data.contract import TaskDataset
from metarun.data.sampler import with_support_copies
from metarun.device import autocast
from metarun.errors import MetarunError
from metarun.saved_run import SavedRun, open_run

ImageLike = Union[str, Path, Image.Image, Tensor]


def load(
    run_dir: str | Path,
    checkpoint: Optional[str] = None,
    device: Optional[str | torch.device] = None,
    head: Optional[str] = None,
) -> TrainedModel:
    """The learner a run trained, from `checkpoints/<checkpoint>.pt` (None: the one a finished run
    tested, best.pt unless train.test_checkpoint=last; "best" or "last" also read a run that has not finished), on `device` ("cpu", "cuda"; None:
    the GPU when PyTorch sees one, else the CPU); with `head` (a conf/head/ name, as `eval.head`)
    its embeddings classified by that head instead of its own classifier. Needs the run's dataset
    (its decoding), not its episodes."""
    return read_run(run_dir, checkpoint, device, option='checkpoint="{}"', head=head)


def read_run(
    run_dir: str | Path,
    checkpoint: Optional[str],
    device: Optional[str | torch.device],
    option: str,
    head: Optional[str] = None,
) -> TrainedModel:
    """`load`, with fixes that name the checkpoint as `option` does."""
    device = "auto" if device in (None, "auto") else torch.device(device).type
    # Building the learner seeds torch's generators (Experiment); the caller's random state is theirs.
    gpu = (device != "cpu" and torch.cuda.is_available()) or torch.cuda.is_initialized()
    cuda = list(range(torch.cuda.device_count())) if gpu else []
    with torch.random.fork_rng(devices=cuda):
        overrides = [f"device.type={device}", *([f"eval.head={head}"] if head else [])]
        run = open_run(run_dir, overrides, checkpoint, parts=(), option=option)
    if isinstance(run.experiment.dataset, TaskDataset):
        raise MetarunError(
            f"{run_dir} learned {run.experiment.dataset.name}'s drawn tasks (not images of classes); "
            "metarun.load adapts image classifiers: give a run trained on images"
        )
    return TrainedModel(run)


class TrainedModel:
    """A trained learner that adapts to a support set of any labels (`adapt`)."""

    def __init__(self, run: SavedRun):
        experiment = run.experiment
        self.learner = experiment.learner.eval()
        self.predictor = experiment.tester.eval()  # the learner, or its embeddings and a head
        self.dataset = experiment.dataset
        self.device, self.amp = experiment.device, experiment.amp
        self.mean_std = run.mean_std  # as the run's test episodes are normalized
        self.support_copies, self.seed = (
            experiment.cfg.eval.support_augment,
            experiment.cfg.eval.seed,
        )
        self.augment = experiment.support_copies_augment() if self.support_copies else None

    def adapt(
        self,
        support_images: Iterable[ImageLike] | Tensor,
        support_labels: Iterable[Hashable],
        generator: Optional[torch.Generator] = None,
    ) -> AdaptedModel:
        """Adapt to the support set: image i has label support_labels[i]. The classes keep the
        order in which the labels first appear. A run tested with eval.support_augment=M adapts to
        each image followed by M augmented copies, as its test episodes hold them, drawn from
        `generator` (by default a CPU generator seeded with the run's eval.seed: the same support
        set gives the same predictions; a test episode's own generator gives that episode's copies)."""
        support_pixels = self.pixels_of(support_images)  # [N*K, C, S, S] in [0, 1]
        labels = list(support_labels)
        if len(labels) != len(support_pixels):
            raise MetarunError(
                f"{len(support_pixels)} support images but {len(labels)} labels; "
                "give one label per image"
            )
        try:
            classes = tuple(dict.fromkeys(labels))
        except TypeError:
            raise MetarunError(
                "support labels must be hashable (names, numbers, tuples); give e.g. str labels"
            ) from None
        learner = self.learner
        if learner.fixed_for_n_way is not None and len(classes) != learner.n_way:
            raise MetarunError(
                f"this run's {type(learner).__name__} classifies {learner.n_way} classes (its "
                f"{learner.fixed_for_n_way}) but the support set has {len(classes)}; "
                f"give exactly {learner.n_way} classes"
            )
        index = {label: i for i, label in enumerate(classes)}
        support_y = torch.tensor([index[label] for label in labels], device=self.device)  # [N*K]
        if self.support_copies:
            generator = (
                generator if generator is not None else torch.Generator().manual_seed(self.seed)
            )
            support_pixels, support_y = self.with_copies(support_pixels, support_y, generator)
        support_x = self.normalized(support_pixels)  # [N*K*(1+M), C, S, S]
        # Gradient-based learners take the inner-loop gradients they need themselves.
        with autocast(self.device, self.amp):
            predict = self.predictor.adapt(support_x, support_y)
        return AdaptedModel(self, predict, classes)

    def with_copies(
        self, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Each support image followed by M augmented copies, `[N*K*(1+M)]`, as the episode sampler
        adds them to a test episode."""
        x, y = with_support_copies(self.augment, x[None], y[None], self.support_copies, [generator])
        return x[0], y[0]

    def images(self, images: Iterable[ImageLike] | Tensor) -> Tensor:
        """`images` as the model's input: float `[M, C, S, S]` on its device, normalized."""
        return self.normalized(self.pixels_of(images))

    def normalized(self, x: Tensor) -> Tensor:
        return x if self.mean_std is None else normalize(x, *self.mean_std)

    def pixels_of(self, images: Iterable[ImageLike] | Tensor) -> Tensor:
        """`images` as float `[M, C, S, S]` in [0, 1] on the model's device."""
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        pixels = (
            self.tensor_pixels(images)
            if isinstance(images, Tensor)
            else [self.pixels(image) for image in images]
        )
        if len(pixels) == 0:
            raise MetarunError("no images given; give file paths, PIL images or tensors")
        return (pixels if isinstance(pixels, Tensor) else torch.stack(pixels)).to(
            self.device
        )  # [M, C, S, S]

    def pixels(self, image: ImageLike) -> Tensor:
        """One image as float `[C, S, S]` in [0, 1], as the episode sampler makes them."""
        if isinstance(image, Tensor):
            if image.dim() != 3:
                raise MetarunError(
                    f"an image tensor in a list must be one image [C, H, W], not shape "
                    f"{tuple(image.shape)}; give a batch [M, C, H, W] on its own, not in a list"
                )
            return self.tensor_pixels(image)[0].cpu()  # stacked with decoded files, then moved
        if isinstance(image, Image.Image):
            return self.dataset.decode(image).float().div_(255)
        if not isinstance(image, (str, Path)):
            raise MetarunError(
                f"a {type(image).__name__} is not an image here; give file paths, PIL images or tensors"
            )
        try:
            with Image.open(image) as opened:
                return self.dataset.decode(opened).float().div_(255)
        except (OSError, ValueError) as e:  # missing, unreadable, not an image
            reason = " ".join(str(e).split())[:120] or type(e).__name__
            raise MetarunError(
                f"cannot read image {image} ({reason}); give image files PIL opens (PNG, JPEG, ...)"
            ) from None

    def tensor_pixels(self, images: Tensor) -> Tensor:
        """`[C, S, S]` or `[M, C, S, S]` decoded images as float `[M, C, S, S]` in [0, 1]."""
        want = tuple(self.dataset.input_shape)  # (C, S, S)
        batch = images[None] if images.dim() == len(want) else images
        if batch.dim() != len(want) + 1 or tuple(batch.shape[1:]) != want:
            shape = tuple(images.shape)
            if batch.dim() == len(want) + 1 and batch.shape[1] != want[0]:
                problem = f"have {batch.shape[1]} channels but this run's model takes {want[0]}"
            else:
                problem = f"have shape {shape} but this run's model takes {want} ([C, H, W]) or a batch of them"
            raise MetarunError(
                f"image tensors {problem}; give tensors of shape {want} (or files and PIL images, "
                "which are decoded and resized as the run's dataset decodes its own)"
            )
        if not batch.is_floating_point():
            return batch.float().div_(255)
        if batch.min() < 0 or batch.max() > 1:
            raise MetarunError(
                "float image tensors must hold pixels in [0, 1], before normalization; "
                "give uint8 images or pixels / 255"
            )
        return batch.float()


class AdaptedModel:
    """A learner adapted to one support set: `classes` (the labels, in their order) and predictions."""

    def __init__(
        self,
        model: TrainedModel,
        predict: Callable[[Tensor], Tensor],
        classes: tuple[Hashable, ...],
    ):
        self.model, self._predict, self.classes = model, predict, classes

    def predict_proba(self, images: Iterable[ImageLike] | Tensor) -> Tensor:
        """Probabilities `[M, N]` on the CPU, column j for classes[j]: the softmax of the learner's
        query scores (logits; Relation Networks' relation scores)."""
        query_x = self.model.images(images)  # [M, C, S, S]
        # Evaluation calls every learner under no_grad: those that need gradients (Baseline's
        # fine-tuning) take them themselves.
        with torch.no_grad(), autocast(self.model.device, self.model.amp):
            scores = self._predict(query_x)  # [M, n_way]
        return scores.float().softmax(dim=-1).cpu()

    def predict(self, images: Iterable[ImageLike] | Tensor) -> list[Hashable]:
        """The most probable class of each image, as given in the support labels."""
        return [self.classes[i] for i in self.predict_proba(images).argmax(dim=-1).tolist()]
