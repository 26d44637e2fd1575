"""Supervised pretraining, the first stage of the two-stage recipes: the backbone f trained as an
ordinary classifier over all C classes of the training part, on shuffled mini-batches of single
images (metarun.data.batches), then tested with a head on its frozen embeddings.

  linear classifier:  logits_c = w_c . f(x) + b_c         (RFS: Tian et al., 2020; Meta-Baseline's
                                                           Classifier-Baseline: Chen et al., 2021)
  cosine classifier:  logits_c = s * cos(f(x), w_c)       (Baseline++: Chen et al., 2019)
  loss:  CE(logits, y), with label smoothing eps optional (Szegedy et al., 2016)

Self-distillation (RFS's born-again generations, Furlanello et al., 2018): with a teacher, a run
of this algorithm trained before on the same classes (`algorithm.teacher=RUN_DIR`, frozen, in
evaluation mode), the loss is

  a * CE(logits, y) + b * T^2 * KL(softmax(teacher / T) || softmax(logits / T))

with T = 4 and a = b = 0.5, RFS's code (distill/criterion.py: the KL summed over classes, averaged
over the batch, times T^2). Each generation is one run whose teacher is the previous one.

Episodes (validation, test, `metarun.load`) are classified by `head` on the frozen embeddings of
the support and query images, embedded together (batch-norm statistics as `model.batch_norm` says:
`running`, the recipes' setting, embeds each image on its own). The default head is Meta-
Baseline's evaluation: cosine similarity to the class means (fixed temperature, as argmax does not
depend on it); `eval.head` tests with any other.

Baseline and Baseline++ (`algorithm=baseline`, `baselinepp`) train the same classifiers on batches
drawn as episodes; `algorithm=pretrain` with `classifier=linear` or `cosine` and `eval.head=finetune`
is the paper's protocol with its shuffled epochs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import EpisodeClassifier, JointEmbedding, accuracy, check_positive
from metarun.data.batches import ImageBatch
from metarun.errors import MetarunError
from metarun.heads.base import Head
from metarun.heads.cosine import CosineHead
from metarun.heads.finetune import classifier_logits

CLASSIFIERS = ("linear", "cosine")


class Pretrain(JointEmbedding, EpisodeClassifier):
    """A backbone `model` and a classifier over the `n_train_classes` training classes (see the
    module docstring). The trainer gives it `ImageBatch`es (`trains_on = "images"`).

    classifier: "linear" (w.x + b, zero bias at initialisation) or "cosine" (s * cos, no bias);
    scale: s of the cosine classifier (Baseline++'s code: 10 for more than 200 classes);
    label_smoothing: eps of the cross-entropy (0: none);
    head: what classifies episodes (a metarun.heads.Head; None: cosine to the class means);
    teacher: a run directory or checkpoint of an earlier pretraining on the same classes, whose
        predictions the loss distils (the trainer loads it; None: no distillation);
    distill_ce, distill_kl, temperature: a, b and T of the distillation loss.
    """

    trains_on = "images"

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        n_train_classes: int,
        classifier: str = "linear",
        scale: float = 10.0,
        label_smoothing: float = 0.0,
        head: Optional[Head] = None,
        teacher: Optional[str] = None,
        distill_ce: float = 0.5,
        distill_kl: float = 0.5,
        temperature: float = 4.0,
    ):
        if classifier not in CLASSIFIERS:
            raise MetarunError(
                f"algorithm.classifier={classifier!r} is not one of {', '.join(CLASSIFIERS)}; "
                "set algorithm.classifier=linear (RFS, Meta-Baseline) or cosine (Baseline++)"
            )
        check_positive("scale", scale)
        check_positive("temperature", temperature, "set algorithm.temperature=4 (RFS's)")
        if not 0 <= label_smoothing < 1:
            raise MetarunError(
                f"algorithm.label_smoothing={label_smoothing} must be in [0, 1); set 0 for none "
                "or e.g. 0.1"
            )
        for key, value in (("distill_ce", distill_ce), ("distill_kl", distill_kl)):
            if value < 0:
                raise MetarunError(f"algorithm.{key}={value} must be >= 0; set 0.5 (RFS's)")
        super().__init__(model, n_way)
        self.n_train_classes = n_train_classes
        self.cosine = classifier == "cosine"
        self.scale, self.label_smoothing = scale, label_smoothing
        self.classifier = nn.Linear(model.out_features, n_train_classes, bias=not self.cosine)
        if self.classifier.bias is not None:
            nn.init.zeros_(self.classifier.bias)
        self.head = head if head is not None else CosineHead(learn_temperature=False)
        self.default_head = self.head.name
        self.teacher = teacher
        self.distill_ce, self.distill_kl, self.temperature = distill_ce, distill_kl, temperature
        # The frozen teacher network, outside the module tree: neither trained, nor saved, nor moved.
        self.__dict__["teacher_net"] = None

    def attach_teacher(self, teacher: Pretrain) -> None:
        """Distil `teacher`'s predictions from now on (frozen, evaluation mode)."""
        if teacher.n_train_classes != self.n_train_classes:
            raise MetarunError(
                f"algorithm.teacher={self.teacher} classifies {teacher.n_train_classes} classes and "
                f"this run trains on {self.n_train_classes}; distil a teacher pretrained on the "
                "same dataset and split"
            )
        teacher.requires_grad_(False)
        self.__dict__["teacher_net"] = teacher.eval()

    def logits(self, x: Tensor) -> Tensor:
        """The training classifier's logits `[B, C]` of images `[B, C, H, W]`."""
        weight, bias = self.classifier.weight, self.classifier.bias
        return classifier_logits(self.model(x), weight, bias, self.cosine, self.scale)

    def forward(
        self, batch: ImageBatch, diagnostics: bool = False, loss_scale: float = 1.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if not isinstance(batch, ImageBatch):
            raise MetarunError(
                "algorithm=pretrain trains on batches of single images (metarun.data.batches), "
                f"not {type(batch).__name__}; train it with metarun, which draws them"
            )
        logits = self.logits(batch.x)
        ce = F.cross_entropy(logits, batch.y, label_smoothing=self.label_smoothing)
        metrics = {"accuracy": accuracy(logits, batch.y)}
        loss = ce
        if self.teacher is not None:
            kl = self.distillation(logits, batch.x)
            loss = self.distill_ce * ce + self.distill_kl * kl
            metrics.update(ce=ce.detach(), kl=kl.detach())
        return loss, {"loss": loss.detach(), **metrics}

    def distillation(self, logits: Tensor, x: Tensor) -> Tensor:
        """T^2 * KL(softmax(teacher / T) || softmax(logits / T)), summed over classes, averaged
        over the batch."""
        teacher = self.__dict__["teacher_net"]
        if teacher is None:
            raise MetarunError(
                f"algorithm.teacher={self.teacher} is set but no teacher was loaded; train with "
                "metarun, which loads it"
            )
        with torch.no_grad():
            target = teacher.logits(x)
        T = self.temperature
        kl = F.kl_div(
            F.log_softmax(logits / T, dim=1), F.softmax(target / T, dim=1), reduction="batchmean"
        )
        return kl * T * T

    def embed_episode(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return super().embed_episode(support_x, support_y, query_x, n_way)

    def episode_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, n_way: int
    ) -> Tensor:
        support_emb, query_emb = self.embed_episode(support_x, support_y, query_x, n_way)
        return self.head(support_emb, support_y, query_emb, n_way)
