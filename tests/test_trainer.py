"""End-to-end runs of the Trainer on real Omniglot (CPU), sized to finish in seconds to a minute."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metarun.checkpoint import load_checkpoint
from metarun.errors import MetarunError
from metarun.trainer import Trainer

# ProtoNet trains on 20-way 5-query episodes (more ways learn faster, as in the paper's 60-way
# training) and is tested on the usual 5-way 15-query episodes.
PROTONET_FAST = (
    "algorithm=protonet",
    "episode=20w1s",
    "episode.meta_batch_size=1",
    "episode.n_query=5",
    "eval.n_way=5",
    "eval.n_query=15",
)


def run(cfg, run_dir) -> dict:
    return Trainer(cfg, run_dir).run()


@pytest.fixture(scope="module")
def protonet_run(tmp_path_factory, omniglot_root, omniglot_cache):
    """One ProtoNet 5-way 1-shot run whose directory several tests read."""
    from tests.conftest import compose_config

    run_dir = tmp_path_factory.mktemp("protonet")
    cfg = compose_config(
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
        "device=cpu",
        *PROTONET_FAST,
        "train.steps=300",
        "train.val_every=150",
        "train.val_episodes=50",
        "train.log_every=25",
        "eval.episodes=200",
    )
    return run_dir, run(cfg, run_dir)


def test_protonet_5w1s_reaches_90_percent_test_accuracy(protonet_run):
    _, results = protonet_run
    assert results["episodes"] == 200
    assert results["test_accuracy"] >= 0.90
    assert 0 < results["ci95"] < 0.03


def test_run_directory_holds_config_checkpoints_logs_and_results(protonet_run):
    run_dir, results = protonet_run
    assert (run_dir / ".hydra" / "config.yaml").read_text().count("ProtoNet") == 1
    assert json.loads((run_dir / "results.json").read_text()) == results
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert last["step"] == 300 and best["step"] in (150, 300)
    assert best["val"]["accuracy"] == pytest.approx(results["best_val_accuracy"])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["split"] == "val"] == [150, 300]
    assert [line["step"] for line in lines if line["split"] == "train"] == list(range(25, 301, 25))
    assert lines[-1]["split"] == "test" and lines[-1]["accuracy"] == pytest.approx(
        results["test_accuracy"]
    )
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


def test_tensorboard_has_train_val_and_hparams(protonet_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(protonet_run[0] / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "train/lr", "val/loss", "val/accuracy"} <= tags
    assert events.Scalars("train/lr")[0].value == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "overrides, chance_margin",
    [
        (
            ("algorithm=maml", "episode.meta_batch_size=4", "episode.n_query=5", "train.steps=40"),
            0.12,
        ),
        (
            (
                "algorithm=fomaml",
                "episode.meta_batch_size=4",
                "episode.n_query=5",
                "train.steps=40",
            ),
            0.12,
        ),
        (
            (
                "algorithm=protonet",
                "episode=5w5s",
                "episode.meta_batch_size=2",
                "episode.n_query=5",
                "train.steps=30",
            ),
            0.5,
        ),
    ],
    ids=["maml-5w1s", "fomaml-5w1s", "protonet-5w5s"],
)
def test_short_runs_learn_well_above_chance(make_config, tmp_path, overrides, chance_margin):
    results = run(make_config(*overrides, "train.val_every=20", "eval.episodes=100"), tmp_path)
    assert results["test_accuracy"] >= 0.2 + chance_margin
    if "maml" in overrides[0]:  # the inner loop visibly works on the logged steps
        logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
        train = [line for line in logged if line["split"] == "train"]
        gains = [line["support_acc_after"] - line["support_acc_before"] for line in train]
        # Most steps, not every one: a float32 rounding of another summation order can tie one.
        assert len(train) == 8 and sum(g > 0 for g in gains) >= 6, gains
        assert sum(gains) / len(gains) > 0.05, gains


def small_run(make_config, *overrides, dataset="omniglot"):
    return make_config(
        "algorithm=protonet",
        "episode.meta_batch_size=2",
        "episode.n_query=3",
        "eval.episodes=30",
        *overrides,
        dataset=dataset,
    )


@pytest.mark.parametrize(
    "dataset, overrides",
    [
        ("omniglot", ()),
        ("folder", ("augment=standard", "augment.query=true", "eval.support_augment=2")),
    ],
    ids=["omniglot", "folder-augmented"],
)
def test_resumed_run_ends_with_the_same_results_as_an_uninterrupted_one(
    make_config, tmp_path, dataset, overrides
):
    config = lambda steps: small_run(
        make_config, f"train.steps={steps}", *overrides, dataset=dataset
    )
    straight = run(config(20), tmp_path / "straight")
    run(config(10), tmp_path / "resumed")  # stops after its first checkpoint
    resumed = run(config(20), tmp_path / "resumed")
    drop_config = lambda r: {k: v for k, v in r.items() if k not in ("config", "wall_time_s")}
    assert drop_config(resumed) == drop_config(straight)
    logs = [
        [
            {k: v for k, v in json.loads(line).items() if k != "tasks_per_s"}
            for line in (d / "metrics.jsonl").open()
        ]
        for d in (tmp_path / "straight", tmp_path / "resumed")
    ]
    # The same train and val lines (the first, shorter run also tested once at step 10).
    assert [line for line in logs[0] if line["split"] != "test"] == [
        line for line in logs[1] if line["split"] != "test"
    ]
    assert logs[0][-1] == logs[1][-1]


def test_resume_refuses_a_run_directory_with_a_different_config(make_config, tmp_path):
    run(small_run(make_config, "train.steps=10"), tmp_path)
    with pytest.raises(MetarunError, match=r"different config \(optimizer.lr: 0.001 -> 0.002\)"):
        Trainer(small_run(make_config, "train.steps=20", "optimizer.lr=0.002"), tmp_path)


def test_resume_with_other_validation_episodes_revalidates_the_best_checkpoint(
    make_config, tmp_path, capsys
):
    # 2-way validation scores high: kept as best_val, it would outscore every later 5-way validation,
    # so best.pt would be chosen, and reported, by a score from other episodes.
    run(small_run(make_config, "train.steps=10", "eval.n_way=2"), tmp_path)
    capsys.readouterr()
    resumed = small_run(make_config, "train.steps=20", "eval.n_way=5")
    results = run(resumed, tmp_path)
    log = capsys.readouterr().out
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    rescorer = Trainer(resumed, tmp_path / "rescore")
    rescorer.learner.load_state_dict(best["learner"])
    rescored = rescorer.evaluate("val", resumed.train.val_episodes)["accuracy"]
    assert results["best_val_accuracy"] == pytest.approx(rescored, abs=1e-12)
    assert best["val"]["accuracy"] == pytest.approx(rescored, abs=1e-12)
    assert "eval.n_way: 2 -> 5 since the last start: best.pt (step 10) re-validated" in log


def test_only_eval_keys_that_move_the_validation_episodes_call_for_revalidation():
    from metarun.config import validation_changes

    old = {
        "eval": {
            "episodes": 600,
            "seed": 0,
            "batch_size": 50,
            "episode": None,
            "n_way": 5,
            "k_shot": 1,
            "n_query": 15,
            "support_augment": 0,
        }
    }
    # The test's episode count and the batch size leave every validation score as it was.
    assert (
        validation_changes(old, {"eval": {**old["eval"], "episodes": 1000, "batch_size": 10}}) == []
    )
    assert validation_changes(
        old, {"eval": {**old["eval"], "seed": 1, "n_query": 5, "episode": "5w5s"}}
    ) == ["eval.seed: 0 -> 1", "eval.n_query: 15 -> 5"]
    assert validation_changes(old, {"eval": {**old["eval"], "support_augment": 2}}) == [
        "eval.support_augment: 0 -> 2"
    ]


def test_truncated_last_checkpoint_is_reported_and_left_untouched(make_config, tmp_path):
    run(small_run(make_config, "train.steps=10"), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(MetarunError, match="cannot read checkpoint"):
        Trainer(small_run(make_config, "train.steps=20"), tmp_path).run()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("episode.n_way=700",), r"episode.n_way=700 but omniglot/val has 688 classes"),
        (
            ("episode.k_shot=10", "episode.n_query=15"),
            r"k_shot=10 \+ episode.n_query=15 = 25 but omniglot/train has 20 images per class",
        ),
        (
            ("dataset.root=/nonexistent/omniglot",),
            r"/nonexistent/omniglot/omniglot-py/images_background is missing",
        ),
        (("device=cuda",), r"device=cuda but PyTorch .* sees no CUDA device"),
        (("device.amp=fp16",), r"device.amp=fp16 needs CUDA"),
        (
            ("algorithm=maml", "algorithm.task_batching=vmapped"),
            r"task_batching='vmapped' is not one of",
        ),
        (
            ("algorithm=maml", "eval.n_way=20"),
            r"MAML was built for 5-way tasks \(its head\) but got 20-way tasks; "
            r"set eval.n_way=5",
        ),
        (("train.grad_clip=0",), r"train.grad_clip=0.0 must be positive"),
        (
            ("model.in_channels=3",),
            r"model.in_channels=3 but omniglot's images have channels=1; "
            r"set model.in_channels=\$\{dataset.channels\} \(the default\)",
        ),
    ],
)
def test_impossible_settings_fail_before_writing_anything(
    make_config, tmp_path, overrides, message
):
    if "cuda" in " ".join(overrides) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(MetarunError, match=message) as error:
        Trainer(make_config(*overrides), tmp_path / "run")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_bf16_autocast_on_cpu_trains_close_to_float32(make_config, tmp_path):
    losses = {}
    for amp in ("none", "bf16"):
        trainer = Trainer(
            small_run(make_config, f"device.amp={amp}", "algorithm=maml"), tmp_path / amp
        )
        tasks = trainer.samplers["train"].sample(2, torch.Generator().manual_seed(0))
        losses[amp] = [trainer.train_step(tasks)["loss"].item() for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses["bf16"])
    assert losses["bf16"][-1] < losses["bf16"][0]  # it learns: the same batch, three steps
    # The first step starts from the same parameters; after it bf16's rounding compounds.
    assert losses["bf16"][0] == pytest.approx(losses["none"][0], rel=0.02)
    assert losses["bf16"] == pytest.approx(losses["none"], rel=0.1)


def test_resume_drops_log_lines_after_the_checkpoint_and_a_half_written_one(tmp_path):
    from metarun.run_log import RunLog

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 10, "loss": 1}\n{"step": 15, "loss": 2}\n{"step": 2'
    )
    RunLog(tmp_path, resume_step=10).close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 10, "loss": 1}\n'


def test_learning_rate_schedule_steps_once_per_meta_step_and_resumes(make_config, tmp_path):
    schedule = (
        "scheduler=step",
        "scheduler.step_size=1",
        "scheduler.gamma=0.5",
        "train.val_every=2",
    )
    run(small_run(make_config, *schedule, "train.steps=2"), tmp_path)
    resumed = Trainer(small_run(make_config, *schedule, "train.steps=3"), tmp_path)
    assert resumed.step == 2
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**2)
    resumed.run()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**3)


@pytest.mark.parametrize("clip", [None, 0.01])
def test_grad_clip_bounds_the_global_norm_of_each_update(make_config, tmp_path, clip):
    # Plain SGD at lr 1: the update is the gradient itself, so its global norm is the clipped norm.
    cfg = make_config(
        "algorithm=protonet",
        "model.hidden=16",
        "optimizer=sgd",
        "optimizer.lr=1.0",
        "optimizer.momentum=0.0",
        f"train.grad_clip={'null' if clip is None else clip}",
    )
    trainer = Trainer(cfg, tmp_path)
    before = [p.detach().clone() for p in trainer.learner.parameters()]
    metrics = trainer.train_step(
        trainer.samplers["train"].sample(2, torch.Generator().manual_seed(0))
    )
    step = torch.linalg.vector_norm(
        torch.stack(
            [
                torch.linalg.vector_norm(p.detach() - b)
                for p, b in zip(trainer.learner.parameters(), before)
            ]
        )
    )
    if clip is None:
        assert (
            "grad_norm" not in metrics and step > 0.1
        )  # the unclipped gradient is far larger than 0.01
    else:
        assert metrics["grad_norm"] > 0.1  # it was clipped...
        assert step == pytest.approx(clip, rel=1e-3)  # ...to exactly the requested norm


def test_augment_standard_takes_the_datasets_own_settings_for_training_episodes_only(
    make_config, tmp_path
):
    trainer = Trainer(
        small_run(make_config, "augment=standard", "augment.flip=false", dataset="miniimagenet"),
        tmp_path,
    )
    augment = trainer.samplers["train"].augment
    # mini-ImageNet's 8-pixel padding of 84x84, in proportion at the fixture's 16x16; flip overridden.
    assert (augment.crop_padding, augment.flip, augment.color_jitter) == (2, False, 0.4)
    assert augment.support and not augment.query
    assert trainer.samplers["val"].augment is None and trainer.samplers["test"].augment is None
    copies = Trainer(
        small_run(make_config, "eval.support_augment=2", dataset="miniimagenet"),
        tmp_path / "copies",
    )
    assert copies.samplers["train"].augment is None  # augment=none: training episodes as drawn
    assert copies.samplers["test"].episodes(0, 0, 1).support_x.shape[1] == 5 * 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ("episode.k_shot=12",),
            r"episode.k_shot=12 \+ episode.n_query=3 = 15 but folder/train has at most 12 images "
            r"in a class; lower episode.k_shot or episode.n_query to sum to at most 12",
        ),
        (
            ("episode.k_shot=7",),
            r"episode.n_way=5 but only 4 of folder/train's 15 classes hold episode.k_shot \+ "
            r"episode.n_query = 10 images; lower episode.n_way, episode.k_shot or episode.n_query",
        ),
    ],
)
def test_too_small_folder_classes_fail_before_writing_anything(
    make_config, tmp_path, overrides, message
):
    with pytest.raises(MetarunError, match=message) as error:
        Trainer(small_run(make_config, *overrides, dataset="folder"), tmp_path / "run")
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()


def test_folder_classes_too_small_for_the_episode_are_named_and_left_out(make_config, tmp_path):
    with pytest.warns(
        UserWarning,
        match=r"folder/train: \d+ classes hold fewer than episode.k_shot \+ "
        r"episode.n_query = 7 images and are left out: class",
    ):
        trainer = Trainer(
            small_run(make_config, "episode.k_shot=4", "eval.k_shot=1", dataset="folder"), tmp_path
        )
    sampler = trainer.samplers["train"]
    assert 5 <= sampler.n_classes < trainer.dataset.n_classes("train")
    assert set(
        sampler.sample(50, torch.Generator().manual_seed(0)).classes.unique().tolist()
    ) <= set(sampler.classes.tolist())


def test_a_resumed_run_may_move_its_data_but_not_change_it(make_config, tmp_path):
    run(small_run(make_config, "train.steps=10", dataset="folder"), tmp_path)
    moved = Trainer(
        small_run(
            make_config,
            "train.steps=20",
            f"dataset.cache_dir={tmp_path / 'elsewhere'}",
            dataset="folder",
        ),
        tmp_path,
    )
    assert moved.step == 10  # dataset.cache_dir is machine-local: the folder dataset declares it
    with pytest.raises(MetarunError, match=r"different config \(dataset.image_size: 16 -> 32\)"):
        Trainer(
            small_run(make_config, "train.steps=20", "dataset.image_size=32", dataset="folder"),
            tmp_path,
        )


def test_resume_on_another_device_type_restarts_the_task_generator_with_one_warning(
    make_config, tmp_path
):
    """last.pt holds the task generator's state of the device it was written on, which a generator of
    another type cannot take (a CUDA generator's state is its seed and offset, 16 bytes; a CPU one's
    5056): resumed there, the generator restarts from a seed of (seed, step) and one warning says
    that the tasks from then on differ from an uninterrupted run's."""
    from metarun.checkpoint import save_checkpoint
    from metarun.data.sampler import episode_seed

    few = ("train.val_every=2", "train.val_episodes=5", "eval.episodes=5")
    run(small_run(make_config, "train.steps=2", *few), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    assert state["device"] == "cpu"
    # last.pt as a run on the GPU writes it: its device type, and a CUDA generator's state.
    save_checkpoint(
        {
            **state,
            "device": "cuda",
            "rng": {**state["rng"], "train_sampler": torch.zeros(16, dtype=torch.uint8)},
        },
        last,
    )
    with pytest.warns(UserWarning) as warned:
        resumed = Trainer(small_run(make_config, "train.steps=4", *few), tmp_path)
    lines = [str(w.message) for w in warned if "was written on cuda" in str(w.message)]
    assert lines == [
        f"{last} was written on cuda and this run resumes on cpu, whose task generator cannot take its "
        "state: it restarts from a seed of (seed, step 2), so the tasks from step 2 on differ from "
        "those of an uninterrupted run"
    ]
    assert resumed.step == 2 and resumed.generator.initial_seed() == episode_seed(0, 2)
    assert resumed.run()["steps"] == 4
