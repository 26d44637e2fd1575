"""Supervised pretraining (algorithm=pretrain): its batches, one epoch against a hand-written loop,
epoch schedules, exact resume mid-epoch, distillation, and every head on a pretrained run."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import normalize

from metarun.algorithms.pretrain import Pretrain
from metarun.data.batches import ImageBatch, ImageBatches
from metarun.data.contract import ClassImages
from metarun.heads.named import head_names, named_head
from metarun.models import Conv4
from metarun.trainer import Trainer
from tests.conftest import one_line_error

PRETRAIN = (
    "algorithm=pretrain",
    "model.batch_norm=running",
    "episode.n_query=3",
    "eval.n_query=3",
)


def pretrain_config(make_config, *overrides, dataset="folder"):
    return make_config(*PRETRAIN, *overrides, dataset=dataset)


def train_lines(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [line for line in lines if line["split"] == "train"]


def ragged_images(counts=(5, 3, 7, 4)) -> ClassImages:
    per_class = [torch.full((n, 1, 4, 4), c, dtype=torch.uint8) for c, n in enumerate(counts)]
    return ClassImages.from_classes(per_class, [f"c{c}" for c in range(len(counts))])


def test_every_image_once_per_epoch_each_labelled_with_its_class():
    images = ragged_images()
    batches = ImageBatches(images, batch_size=4, seed=3)
    assert batches.steps_per_epoch == 5  # 19 images: four batches of 4, one of 3
    for epoch in range(2):
        steps = range(epoch * 5, epoch * 5 + 5)
        seen = torch.cat([batches.indices(s) for s in steps])
        assert sorted(seen.tolist()) == list(range(19))
        for s in steps:
            batch = batches.batch(s, torch.Generator())
            assert torch.equal(batch.y, (batch.x[:, 0, 0, 0] * 255).round().long())  # pixel = class
    # Epochs are shuffled differently, and a batch depends on (seed, step) alone.
    assert not torch.equal(batches.order(0), batches.order(1))
    again = ImageBatches(images, batch_size=4, seed=3)
    assert torch.equal(again.indices(7), batches.indices(7))
    # Two processes split every batch between them.
    halves = [ImageBatches(images, 4, 3, share=(rank, 2)).indices(7) for rank in range(2)]
    assert sorted(torch.cat(halves).tolist()) == sorted(batches.indices(7).tolist())


def test_one_epoch_equals_a_hand_written_training_loop(make_config, tmp_path):
    cfg = pretrain_config(
        make_config,
        "train.epochs=1",
        "train.val_every=1",
        "train.batch_size=8",
        "train.log_every=1",
        "optimizer=sgd",
        "optimizer.lr=0.05",
        "model.batch_norm=task",  # plain batch statistics: what a hand-written loop has
    )
    trainer = Trainer(cfg, tmp_path)
    reference = copy.deepcopy(trainer.learner)
    batches = trainer.samplers["train"]
    trainer.run()

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(batches.steps_per_epoch):
        chosen = batches.indices(step)
        x = normalize(batches.images[chosen].float() / 255, *batches.mean_std)
        logits = reference.model(x) @ reference.classifier.weight.T + reference.classifier.bias
        loss = F.cross_entropy(logits, batches.labels[chosen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    logged = [line["loss"] for line in train_lines(tmp_path)]
    assert len(logged) == batches.steps_per_epoch == -(-len(batches) // 8)
    assert logged == pytest.approx(losses, rel=1e-5)
    trained = trainer.learner.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6)


def test_an_epoch_schedule_steps_the_scheduler_and_validates_once_per_epoch(make_config, tmp_path):
    cfg = pretrain_config(
        make_config,
        "train.epochs=3",
        "train.val_every=1",
        "train.batch_size=16",
        "train.log_every=1",
        "scheduler=step",
        "scheduler.step_size=1",  # epochs, as train.epochs counts
        "scheduler.gamma=0.5",
    )
    results = Trainer(cfg, tmp_path).run()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    per_epoch = results["steps"] // 3
    assert results["steps"] == 3 * per_epoch
    val_steps = [line["step"] for line in lines if line["split"] == "val"]
    assert val_steps == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    lr = {line["step"]: line["lr"] for line in lines if line["split"] == "train"}
    # A line's lr is the one after its step: the schedule moves at each epoch's end.
    assert lr[1] == pytest.approx(1e-3) and lr[per_epoch] == pytest.approx(5e-4)
    assert lr[per_epoch + 1] == pytest.approx(5e-4) and lr[3 * per_epoch] == pytest.approx(1.25e-4)
    epochs = {line["step"]: line["epoch"] for line in lines if line["split"] == "train"}
    assert epochs[per_epoch] == 1.0 and epochs[1] == pytest.approx(1 / per_epoch)


def test_a_run_resumed_mid_epoch_equals_an_uninterrupted_one(make_config, tmp_path):
    # Augmented (the trainer's generator), in steps that do not fill whole epochs.
    config = lambda steps: pretrain_config(
        make_config, f"train.steps={steps}", "train.batch_size=16", "augment=standard"
    )
    trainer = Trainer(config(20), tmp_path / "straight")
    assert 10 % trainer.epoch_steps != 0  # the first run stops inside an epoch
    straight = trainer.run()
    Trainer(config(10), tmp_path / "resumed").run()
    resumed = Trainer(config(20), tmp_path / "resumed").run()
    drop = lambda r: {k: v for k, v in r.items() if k not in ("config", "wall_time_s")}
    assert drop(resumed) == drop(straight)
    rate = lambda lines: [{k: v for k, v in ln.items() if k != "images_per_s"} for ln in lines]
    assert rate(train_lines(tmp_path / "resumed")) == rate(train_lines(tmp_path / "straight"))


def test_epochs_belong_to_learners_that_train_on_images(make_config, tmp_path):
    episodic = make_config("algorithm=protonet", "train.epochs=2", "train.val_every=1")
    assert "trains on episodes, which have no epochs" in one_line_error(
        lambda: Trainer(episodic, tmp_path)
    )
    unit = pretrain_config(make_config, "train.epochs=2")  # val_every=10 of SMALL_RUN
    assert "train.val_every=10 counts epochs" in one_line_error(lambda: Trainer(unit, tmp_path))


def test_testing_the_last_checkpoint_tests_the_final_weights(make_config, tmp_path):
    cfg = pretrain_config(make_config, "train.test_checkpoint=last", "train.steps=12")
    trainer = Trainer(cfg, tmp_path)
    results = trainer.run()
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == results["steps"] == 12
    assert "base_statistics" in last  # kept with the tested weights
    final = trainer.learner.state_dict()
    assert all(torch.equal(final[k], v) for k, v in last["learner"].items())


def teacher_and_student(n_classes=6):
    torch.manual_seed(0)
    make = lambda: Pretrain(Conv4(1, 8, image_size=16), 5, n_classes, teacher="teacher-run")
    teacher, student = make(), make()
    student.attach_teacher(teacher)
    return teacher, student


def test_distillation_loss_is_half_cross_entropy_half_t_squared_kl():
    teacher, student = teacher_and_student()
    x, y = torch.randn(10, 1, 16, 16), torch.arange(10) % 6
    loss, metrics = student(ImageBatch(x, y))
    s, t = student.logits(x), teacher.logits(x)
    p_t = F.softmax(t / 4, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 4, dim=1))).sum(dim=1).mean() * 16
    expected = 0.5 * F.cross_entropy(s, y) + 0.5 * kl
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["kl"], kl.detach())
    # The teacher is frozen and outside the student: not trained, saved or given to an optimizer.
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(k.startswith("teacher") for k in student.state_dict())
    assert len(list(student.parameters())) == len(list(teacher.parameters()))


def test_a_teacher_of_other_classes_is_one_line():
    teacher = Pretrain(Conv4(1, 8, image_size=16), 5, 7)
    student = Pretrain(Conv4(1, 8, image_size=16), 5, 6, teacher="run")
    assert "classifies 7 classes and this run trains on 6" in one_line_error(
        lambda: student.attach_teacher(teacher)
    )


@pytest.mark.parametrize(
    "options", [{"classifier": "mlp"}, {"label_smoothing": 1.0}, {"temperature": 0}]
)
def test_options_out_of_range_are_one_line(options):
    one_line_error(lambda: Pretrain(Conv4(1, 8, image_size=16), 5, 6, **options))


@pytest.fixture(scope="module")
def pretrained_omniglot(tmp_path_factory, omniglot_root, omniglot_cache):
    """A short Omniglot pretraining (150 batches of 64 images) whose directory several tests read."""
    from tests.conftest import SMALL_RUN, compose_config

    run_dir = tmp_path_factory.mktemp("pretrained")
    cfg = compose_config(
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
        *SMALL_RUN,
        "algorithm=pretrain",
        "model.batch_norm=running",
        "optimizer=sgd",
        "optimizer.lr=0.1",
        "train.steps=150",
        "train.val_every=150",
        "train.log_every=50",
        "eval.episodes=100",
    )
    return run_dir, Trainer(cfg, run_dir).run()


def test_a_short_pretraining_classifies_omniglot_episodes_far_above_chance(pretrained_omniglot):
    _, results = pretrained_omniglot
    assert results["head"] == "cosine" and results["transductive"] is False
    assert results["test_accuracy"] > 0.4  # chance: 0.2


@pytest.mark.parametrize("head", head_names())
def test_every_head_tests_a_pretrained_run(pretrained_omniglot, head):
    from metarun.saved_run import open_run

    run_dir, _ = pretrained_omniglot
    run = open_run(run_dir, [f"eval.head={head}", "eval.episodes=20"])
    test = run.experiment.evaluate("test", 20)
    assert test["accuracy"] > 0.35, head  # chance: 0.2
    assert named_head(head).name == head
