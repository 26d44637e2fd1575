"""Episode sampler: shapes, labels, disjointness, reproducibility and config errors.

Synthetic images whose pixels spell out (class id, item id) make every check exact.
"""

from __future__ import annotations

import pytest
import torch

from metarun.data.augment import Augment
from metarun.data.contract import ClassImages
from metarun.data.sampler import EpisodeSampler
from metarun.data.tasks import TaskBatch
from metarun.errors import MetarunError


def id_images(n_classes: int, per_class: int, first_class: int = 0) -> torch.Tensor:
    """uint8 [C, M, 1, 2, 2]: pixel (0, 0) holds the class id, pixel (0, 1) the item id."""
    images = torch.zeros(n_classes, per_class, 1, 2, 2, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = torch.arange(first_class, first_class + n_classes)[:, None]
    images[:, :, 0, 0, 1] = torch.arange(per_class)[None, :]
    return images


def ids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class id, item id) of each item of x [T, n, 1, 2, 2] float in [0, 1]."""
    pixels = (x[:, :, 0, 0] * 255).round().long()  # [T, n, 2]
    return pixels[..., 0], pixels[..., 1]


def sampler(n_way=5, k_shot=2, n_query=3, n_classes=20, per_class=20, first_class=0):
    return EpisodeSampler(
        id_images(n_classes, per_class, first_class),
        n_way,
        k_shot,
        n_query,
        part="val",
        dataset_name="omniglot",
    )


def assert_same(a: TaskBatch, b: TaskBatch) -> None:
    for name in ("support_x", "support_y", "query_x", "query_y", "classes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_sample_shapes_and_dtypes():
    tasks = sampler(n_way=5, k_shot=2, n_query=3).sample(4, torch.Generator().manual_seed(0))
    assert tasks.support_x.shape == (4, 10, 1, 2, 2) and tasks.query_x.shape == (4, 15, 1, 2, 2)
    assert tasks.support_y.shape == (4, 10) and tasks.query_y.shape == (4, 15)
    assert tasks.support_x.dtype == torch.float32 and tasks.support_y.dtype == torch.int64
    assert 0.0 <= tasks.support_x.min() and tasks.query_x.max() <= 1.0
    assert tasks.n_way == 5 and len(tasks) == 4


def test_each_label_0_to_n_minus_1_has_exactly_k_support_and_q_query_items():
    tasks = sampler(n_way=5, k_shot=2, n_query=3).sample(8, torch.Generator().manual_seed(1))
    for t in range(8):
        assert torch.bincount(tasks.support_y[t], minlength=5).tolist() == [2] * 5
        assert torch.bincount(tasks.query_y[t], minlength=5).tolist() == [3] * 5


def test_labels_name_n_distinct_classes_and_support_query_are_disjoint():
    tasks = sampler(n_way=5, k_shot=4, n_query=16).sample(16, torch.Generator().manual_seed(2))
    s_class, s_item = ids(tasks.support_x)
    q_class, q_item = ids(tasks.query_x)
    for t in range(16):
        label_to_class = {}
        labels = torch.cat([tasks.support_y[t], tasks.query_y[t]]).tolist()
        for y, c in zip(labels, torch.cat([s_class[t], q_class[t]]).tolist()):
            assert label_to_class.setdefault(y, c) == c  # one class per label, in support and query
        assert len(set(label_to_class.values())) == 5
        support = set(zip(s_class[t].tolist(), s_item[t].tolist()))
        query = set(zip(q_class[t].tolist(), q_item[t].tolist()))
        assert len(support) == 20 and len(query) == 80  # no image twice
        assert not support & query


def test_classes_name_the_class_behind_each_label():
    tasks = sampler(first_class=0).sample(4, torch.Generator().manual_seed(0))
    assert tasks.classes.shape == (4, 5) and tasks.classes.dtype == torch.long
    for x, y in ((tasks.support_x, tasks.support_y), (tasks.query_x, tasks.query_y)):
        class_ids, _ = ids(x)
        assert torch.equal(tasks.classes.gather(1, y), class_ids)
    fixed = sampler().episodes(seed=3, start=0, count=2)
    assert torch.equal(fixed.classes.gather(1, fixed.support_y), ids(fixed.support_x)[0])


def test_classes_come_only_from_the_given_part():
    tasks = sampler(n_way=5, n_classes=20, first_class=100).sample(
        32, torch.Generator().manual_seed(3)
    )
    classes = torch.cat([ids(tasks.support_x)[0], ids(tasks.query_x)[0]], dim=1)
    assert classes.min() >= 100 and classes.max() < 120
    assert len(classes.unique()) == 20  # 32 tasks of 5 reach every class


def test_labels_are_assigned_at_random_and_items_shuffled():
    tasks = sampler(n_way=5, k_shot=2, n_query=3).sample(64, torch.Generator().manual_seed(4))
    s_class = ids(tasks.support_x)[0]
    label0_class = s_class[tasks.support_y == 0].view(64, 2)[:, 0]
    # label 0 is not always the task's smallest class id, as a sorted assignment would make it
    smallest = s_class.min(dim=1).values
    assert (label0_class != smallest).sum() > 20
    # items are not grouped label by label
    grouped = torch.arange(5).repeat_interleave(2)
    assert (tasks.support_y != grouped).any(dim=1).sum() > 60


def test_training_episodes_repeat_for_one_seed_and_differ_for_another():
    s = sampler()
    a = s.sample(4, torch.Generator().manual_seed(7))
    b = s.sample(4, torch.Generator().manual_seed(7))
    c = s.sample(4, torch.Generator().manual_seed(8))
    assert_same(a, b)
    assert not torch.equal(a.support_x, c.support_x)


def stack(batches: list[TaskBatch]) -> TaskBatch:
    cat = lambda name: torch.cat([getattr(b, name) for b in batches])
    return TaskBatch(
        cat("support_x"),
        cat("support_y"),
        cat("query_x"),
        cat("query_y"),
        batches[0].n_way,
        cat("classes"),
    )


def test_fixed_episodes_equal_stacked_single_episodes_on_any_sampler():
    s1, s2 = sampler(), sampler()
    batch = s1.episodes(seed=0, start=0, count=10)
    assert_same(batch, stack([s2.episode(seed=0, index=i) for i in range(10)]))
    assert_same(s2.episodes(seed=0, start=4, count=3), stack([batch.task(i) for i in (4, 5, 6)]))
    assert not torch.equal(batch.support_x[0], batch.support_x[1])
    assert not torch.equal(s1.episode(seed=1, index=0).support_x, batch.support_x[:1])


@pytest.mark.cuda
def test_sampling_on_the_gpu_stays_there_and_fixed_episodes_match_the_cpu():
    images = id_images(20, 20)
    gpu = EpisodeSampler(images.cuda(), 5, 1, 15, part="val")
    tasks = gpu.sample(8, torch.Generator("cuda").manual_seed(0))
    assert tasks.support_x.is_cuda and tasks.query_y.is_cuda
    assert_same(
        gpu.episodes(0, 0, 6).to("cpu"),
        EpisodeSampler(images, 5, 1, 15, part="val").episodes(0, 0, 6),
    )


def test_too_many_ways_names_the_key_and_the_class_count():
    with pytest.raises(
        MetarunError, match=r"episode.n_way=30 but omniglot/val has 20 classes; lower episode.n_way"
    ):
        sampler(n_way=30, n_classes=20)


def test_too_many_shots_plus_queries_names_both_keys_and_the_images_per_class():
    with pytest.raises(MetarunError) as error:
        sampler(k_shot=5, n_query=16, per_class=20)
    message = str(error.value)
    assert (
        "episode.k_shot=5" in message
        and "episode.n_query=16" in message
        and "20 images per class" in message
    )
    assert "\n" not in message


@pytest.mark.parametrize("key", ["n_way", "k_shot", "n_query"])
def test_non_positive_episode_sizes_are_rejected(key):
    with pytest.raises(MetarunError, match=f"episode.{key}=0"):
        sampler(**{key: 0})


def test_real_omniglot_five_way_one_shot(omniglot):
    s = EpisodeSampler(omniglot.images("test"), n_way=5, k_shot=1, n_query=15, part="test")
    tasks = s.sample(2, torch.Generator().manual_seed(0))
    assert tasks.support_x.shape == (2, 5, 1, 28, 28) and tasks.query_x.shape == (2, 75, 1, 28, 28)
    assert tasks.support_x.max() == 1.0


def ragged(counts: list[int]) -> ClassImages:
    """Classes of the given sizes; pixel (0, 0) holds the class id, pixel (0, 1) the item id."""
    per_class = [id_images(1, n, first_class=c)[0] for c, n in enumerate(counts)]
    return ClassImages.from_classes(per_class, [f"class{c}" for c in range(len(counts))])


def test_ragged_classes_give_distinct_items_of_each_class_and_never_an_item_past_its_count():
    counts = [3, 9, 4, 12, 5, 3]
    s = EpisodeSampler(ragged(counts), n_way=4, k_shot=1, n_query=2, part="train")
    tasks = s.sample(200, torch.Generator().manual_seed(0))
    classes = torch.cat([ids(tasks.support_x)[0], ids(tasks.query_x)[0]], dim=1)  # [T, 12]
    items = torch.cat([ids(tasks.support_x)[1], ids(tasks.query_x)[1]], dim=1)
    assert (items < torch.tensor(counts)[classes]).all()  # no padding position was drawn
    for t in range(200):
        pairs = set(zip(classes[t].tolist(), items[t].tolist()))
        assert len(pairs) == 12  # no image twice
    # every item of the largest class is reached
    assert set(items[classes == 3].tolist()) == set(range(12))


def test_classes_with_too_few_images_are_named_in_a_warning_and_never_drawn():
    with pytest.warns(
        UserWarning,
        match=r"train: 2 classes hold fewer than episode.k_shot \+ episode.n_query = 4 "
        r"images and are left out: class0, class5",
    ):
        s = EpisodeSampler(ragged([3, 9, 4, 12, 5, 3]), n_way=3, k_shot=1, n_query=3, part="train")
    assert s.n_classes == 4
    classes = ids(s.sample(100, torch.Generator().manual_seed(0)).support_x)[0]
    assert set(classes.unique().tolist()) == {1, 2, 3, 4}


def test_too_few_usable_classes_for_n_way_is_one_line():
    with pytest.raises(
        MetarunError, match=r"episode.n_way=5 but only 4 of dataset/train's 6 classes hold"
    ) as error:
        EpisodeSampler(ragged([3, 9, 4, 12, 5, 3]), n_way=5, k_shot=1, n_query=3, part="train")
    assert "\n" not in str(error.value)


def test_episodes_are_normalized_with_the_given_mean_and_std():
    plain = sampler().episodes(seed=0, start=0, count=2)
    s = EpisodeSampler(id_images(20, 20), 5, 2, 3, part="val", mean=[0.5], std=[0.25])
    normalized = s.episodes(seed=0, start=0, count=2)
    torch.testing.assert_close(normalized.support_x, (plain.support_x - 0.5) / 0.25)
    torch.testing.assert_close(normalized.query_x, (plain.query_x - 0.5) / 0.25)


def standard_augment() -> Augment:
    return Augment().resolve({"crop_padding": 1, "flip": True, "color_jitter": 0.4})


def test_augmentation_changes_support_images_but_not_which_images_labels_or_queries():
    images = torch.randint(0, 256, (20, 20, 3, 8, 8), dtype=torch.uint8)
    plain = EpisodeSampler(images, 5, 2, 3, part="train").sample(
        4, torch.Generator().manual_seed(0)
    )
    augmented = EpisodeSampler(images, 5, 2, 3, part="train", augment=standard_augment()).sample(
        4, torch.Generator().manual_seed(0)
    )
    # Indices are drawn before the augmentation's parameters: the same episode, other pixels.
    for name in ("support_y", "query_y", "classes", "query_x"):
        assert torch.equal(getattr(plain, name), getattr(augmented, name)), name
    changed = (plain.support_x != augmented.support_x).flatten(2).any(-1)  # [T, N*K]
    assert changed.float().mean() > 0.9
    assert augmented.support_x.min() >= 0 and augmented.support_x.max() <= 1


def test_augmented_episodes_repeat_for_one_seed_and_differ_for_another():
    images = torch.randint(0, 256, (20, 20, 3, 8, 8), dtype=torch.uint8)
    s = EpisodeSampler(images, 5, 2, 3, part="train", augment=standard_augment())
    a, b = (s.sample(4, torch.Generator().manual_seed(7)) for _ in range(2))
    assert_same(a, b)
    c = EpisodeSampler(images, 5, 2, 3, part="train").sample(4, torch.Generator().manual_seed(7))
    assert not torch.equal(a.support_x, c.support_x)


def test_support_copies_add_m_augmented_copies_per_episode_independent_of_the_batch():
    images = torch.randint(0, 256, (20, 20, 3, 8, 8), dtype=torch.uint8)
    plain = EpisodeSampler(images, 5, 2, 3, part="test").episodes(seed=0, start=0, count=4)
    s = EpisodeSampler(images, 5, 2, 3, part="test", augment=standard_augment(), support_copies=3)
    batch = s.episodes(seed=0, start=0, count=4)
    assert batch.support_x.shape == (4, 10 * 4, 3, 8, 8)
    assert torch.equal(batch.support_x[:, :10], plain.support_x)  # the originals first
    assert torch.equal(
        batch.support_y, torch.cat([plain.support_y, plain.support_y.repeat_interleave(3, 1)], 1)
    )
    assert torch.equal(batch.query_x, plain.query_x)
    copies = batch.support_x[:, 10:].unflatten(1, (10, 3))  # [T, N*K, M, C, H, W]
    assert not torch.equal(copies[:, :, 0], copies[:, :, 1])
    assert_same(stack([s.episode(seed=0, index=i) for i in range(4)]), batch)
