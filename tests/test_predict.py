"""`metarun.load(RUN_DIR).adapt(...).predict(...)` and `metarun-predict` on real Omniglot drawings of
test characters, with short real runs (ProtoNet, second-order MAML)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import metarun
from metarun.checkpoint import load_checkpoint, save_checkpoint
from metarun.commands.predict import main
from metarun.data.sampler import episode_seed
from metarun.experiment import Experiment
from metarun.run_dir import write_config
from metarun.saved_run import read_config
from metarun.trainer import Trainer
from tests.conftest import REPO, compose_config, one_line_error
from tests.test_zoo import ALGORITHMS, tiny
from tests.trained_runs import trained_run

SPLIT = REPO / "metarun" / "splits" / "omniglot-vinyals" / "test.txt"
N_QUERY = 6  # held-out drawings of each character


@pytest.fixture(scope="module")
def protonet_run(tmp_path_factory, omniglot_root, omniglot_cache):
    return trained_run("protonet", tmp_path_factory, omniglot_root, omniglot_cache)[0]


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory, omniglot_root, omniglot_cache):
    return trained_run("maml", tmp_path_factory, omniglot_root, omniglot_cache)[0]


@pytest.fixture(scope="module")
def augmented_run(tmp_path_factory, omniglot_root, omniglot_cache) -> Path:
    """A short ProtoNet run validated and tested with 2 augmented copies of each support image."""
    run_dir = tmp_path_factory.mktemp("augmented")
    cfg = compose_config(
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
        "device=cpu",
        "algorithm=protonet",
        "model.hidden=16",
        "episode.meta_batch_size=2",
        "episode.n_query=5",
        "train.steps=10",
        "train.val_every=10",
        "train.val_episodes=10",
        "train.log_every=10",
        "eval.support_augment=2",
        "eval.episodes=10",
        "eval.batch_size=1",
    )
    Trainer(cfg, run_dir).run()
    return run_dir


@pytest.fixture(scope="module")
def characters(tmp_path_factory, omniglot_root) -> Path:
    """5 test characters of the Vinyals split, one from each of 5 evaluation alphabets, copied as
    support/<name>/ (1 drawing) and query/<name>/ (N_QUERY other drawings)."""
    evaluation = omniglot_root / "omniglot-py" / "images_evaluation"
    chosen = {}
    for name in SPLIT.read_text().split():
        alphabet, character, rotation = name.split("/")
        if (
            rotation == "rot000"
            and alphabet not in chosen
            and (evaluation / alphabet / character).is_dir()
        ):
            chosen[alphabet] = evaluation / alphabet / character
        if len(chosen) == 5:
            break
    root = tmp_path_factory.mktemp("characters")
    for alphabet, folder in chosen.items():
        drawings = sorted(folder.glob("*.png"))
        label = f"{alphabet}-{folder.name}"
        for part, files in (("support", drawings[:1]), ("query", drawings[1 : 1 + N_QUERY])):
            (root / part / label).mkdir(parents=True)
            for f in files:
                shutil.copy(f, root / part / label / f.name)
    return root


def task_files(characters: Path) -> tuple[list[Path], list[str], list[Path], list[str]]:
    support = sorted((characters / "support").glob("*/*.png"))
    query = sorted((characters / "query").glob("*/*.png"))
    return support, [p.parent.name for p in support], query, [p.parent.name for p in query]


@pytest.mark.parametrize("run", ["protonet", "maml"])
def test_adapted_model_names_held_out_drawings_of_new_characters(request, characters, run):
    support, labels, query, truth = task_files(characters)
    task = metarun.load(request.getfixturevalue(f"{run}_run"), device="cpu").adapt(support, labels)
    assert task.classes == tuple(sorted(set(labels)))  # the order the labels first appear in
    predicted = task.predict(query)
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    assert accuracy >= 0.6, (run, accuracy)  # chance: 0.2
    proba = task.predict_proba(query)
    assert proba.shape == (5 * N_QUERY, 5)
    assert torch.allclose(proba.sum(dim=1), torch.ones(len(query)))
    assert [task.classes[i] for i in proba.argmax(dim=1)] == predicted


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_in_the_zoo_adapts_and_predicts(
    make_config, tmp_path, characters, algorithm
):
    """Untrained learners, each saved as a run's best checkpoint (a run not tested yet, so the
    checkpoint is named): the contract, not accuracy. On the folder fixture (RGB, 16x16, normalized
    with its own mean and std), so the PNGs are decoded as a folder dataset decodes its files."""
    trainer = Trainer(tiny(make_config, algorithm, dataset="folder"), tmp_path)
    write_config(tmp_path, trainer.cfg)
    save_checkpoint(
        {"learner": trainer.learner.state_dict(), "step": 0}, tmp_path / "checkpoints" / "best.pt"
    )
    support, labels, query, _ = task_files(characters)
    task = metarun.load(tmp_path, "best", device="cpu").adapt(support, labels)
    proba = task.predict_proba(query)
    assert proba.shape == (len(query), 5) and torch.allclose(
        proba.sum(dim=1), torch.ones(len(query))
    )
    assert set(task.predict(query)) <= set(labels)


def test_files_are_decoded_exactly_as_the_dataset_decoded_its_own(protonet_run, characters):
    model = metarun.load(protonet_run, device="cpu")
    _, _, query, _ = task_files(characters)
    alphabet, character = query[0].parent.name.rsplit("-", 1)
    part = model.dataset.part("test")
    cached = part.class_images(
        part.names.index(f"{alphabet}/{character}/rot000")
    )  # [20, 1, 28, 28] uint8
    folder = model.dataset.root / "omniglot-py" / "images_evaluation" / alphabet / character
    drawing = [p.name for p in sorted(folder.glob("*.png"))].index(
        query[0].name
    )  # the cache's order
    with Image.open(query[0]) as image:
        assert torch.equal(
            model.dataset.decode(image), cached[drawing]
        )  # inverted, 28x28, one channel
    # A file, its PIL image and the cached tensor are the same input.
    support, labels, _, _ = task_files(characters)
    task = model.adapt(support, labels)
    with Image.open(query[0]) as image:
        inputs = [[query[0]], [image], cached[drawing][None]]
        probabilities = [task.predict_proba(x) for x in inputs]
    assert torch.equal(probabilities[0], probabilities[1]) and torch.equal(
        probabilities[0], probabilities[2]
    )


def test_labels_may_be_any_hashable_names_and_come_back_as_given(protonet_run, characters):
    support, labels, query, truth = task_files(characters)
    names = {
        label: (i, label.upper()) for i, label in enumerate(sorted(set(labels)))
    }  # tuples as labels
    task = metarun.load(protonet_run, device="cpu").adapt(
        support, [names[label] for label in labels]
    )
    predicted = task.predict(query)
    assert set(predicted) <= set(names.values()) and task.classes == tuple(names.values())
    assert sum(p == names[t] for p, t in zip(predicted, truth)) / len(truth) >= 0.6


def test_wrong_image_shapes_channels_and_class_counts_are_one_line(
    protonet_run, maml_run, characters
):
    support, labels, query, _ = task_files(characters)
    task = metarun.load(protonet_run, device="cpu").adapt(support, labels)
    assert "have 3 channels but this run's model takes 1" in one_line_error(
        lambda: task.predict(torch.zeros(3, 28, 28))
    )
    assert "have shape (1, 32, 32)" in one_line_error(
        lambda: task.predict(torch.zeros(1, 32, 32, dtype=torch.uint8))
    )
    assert "pixels in [0, 1]" in one_line_error(
        lambda: task.predict(torch.full((1, 28, 28), 255.0))
    )
    assert "cannot read image" in one_line_error(lambda: task.predict([characters / "nothing.png"]))
    maml = metarun.load(maml_run, device="cpu")
    assert (
        "classifies 5 classes (its head) but the support set has 3; give exactly 5"
        in one_line_error(lambda: maml.adapt(support[:3], labels[:3]))
    )
    assert "3 support images but 2 labels" in one_line_error(
        lambda: maml.adapt(support[:3], labels[:2])
    )


def test_adapt_adds_the_runs_support_copies_and_predicts_as_its_own_test(augmented_run):
    """A run tested with eval.support_augment=2 adapts to each support image and 2 augmented copies:
    given the generator its test episode drew them from, metarun.load predicts that episode's queries
    exactly as the run's own test did; by default the copies come from a generator seeded with
    eval.seed, so the same support set always gives the same predictions."""
    model = metarun.load(augmented_run, device="cpu")
    cfg = read_config(augmented_run)
    own = Experiment(cfg, parts=("test",))  # the run's own test episodes and learner
    own.learner.load_state_dict(
        load_checkpoint(augmented_run / "checkpoints" / "best.pt")["learner"]
    )
    own.learner.eval()
    sampler, seed, originals = (
        own.samplers["test"],
        cfg.eval.seed,
        5 * 1,
    )  # N*K support images before the copies
    tested = json.loads((augmented_run / "test_episodes.json").read_text())["values"]
    accuracies = []
    for index in range(10):
        episode = sampler.episode(seed, index)
        support_x, support_y = episode.support_x[0], episode.support_y[0]
        assert len(support_x) == originals * 3
        generator = torch.Generator().manual_seed(episode_seed(seed, index))
        sampler._draw(
            1, generator
        )  # the generator as the episode's draw of classes and images leaves it
        task = model.adapt(
            support_x[:originals], support_y[:originals].tolist(), generator=generator
        )
        predicted = torch.tensor(task.predict(episode.query_x[0]))
        with torch.no_grad():
            expected = own.learner.adapt(support_x, support_y)(episode.query_x[0]).argmax(dim=-1)
        assert torch.equal(predicted, expected), index
        accuracies.append((predicted == episode.query_y[0]).float().mean().item())
    assert accuracies == tested  # the run's own test, episode by episode
    episode = sampler.episode(seed, 0)
    support, labels = episode.support_x[0, :originals], episode.support_y[0, :originals].tolist()
    once, again = (model.adapt(support, labels).predict_proba(episode.query_x[0]) for _ in range(2))
    assert torch.equal(once, again)


def test_load_leaves_the_callers_random_state_as_it_was(protonet_run):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    expected = torch.rand(5)  # what the caller's next draw would have been without load
    torch.set_rng_state(before)
    metarun.load(protonet_run, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(5), expected)


def test_load_without_a_checkpoint_is_one_line(protonet_run, tmp_path):
    shutil.copytree(protonet_run / ".hydra", tmp_path / ".hydra")
    assert "train it first" in one_line_error(lambda: metarun.load(tmp_path))


def test_metarun_predict_writes_a_csv_of_predictions_and_probabilities(
    protonet_run, characters, tmp_path, capsys
):
    out = tmp_path / "preds.csv"
    main(
        [
            str(protonet_run),
            "--support",
            str(characters / "support"),
            "--query",
            str(characters / "query"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    with out.open() as f:
        rows = list(csv.DictReader(f))
    classes = sorted(p.name for p in (characters / "support").iterdir())
    assert list(rows[0]) == ["file", "predicted", *classes]
    assert len(rows) == 5 * N_QUERY
    assert all(abs(sum(float(row[c]) for c in classes) - 1) < 1e-4 for row in rows)
    assert all(row["predicted"] == max(classes, key=lambda c: float(row[c])) for row in rows)
    correct = sum(row["predicted"] == Path(row["file"]).parent.name for row in rows)
    assert correct / len(rows) >= 0.6
    printed = capsys.readouterr().out
    assert (
        f"wrote {out}: {5 * N_QUERY} images, 5 classes" in printed and "... and 10 more" in printed
    )


@pytest.mark.parametrize(
    "layout, message",
    [
        (
            "empty-class",
            r"support class \S+ \(.+\) holds no images; put at least one image in it or remove the folder",
        ),
        ("no-classes", r"holds no class folders"),
        ("not-an-image", r"cannot read image .+notes.txt"),
    ],
)
def test_metarun_predict_bad_folders_are_one_line_with_exit_2(
    protonet_run, characters, tmp_path, capsys, layout, message
):
    support = tmp_path / "support"
    shutil.copytree(characters / "support", support)
    if layout == "empty-class":
        (support / "new-class").mkdir()
    elif layout == "no-classes":
        shutil.rmtree(support)
        support.mkdir()
    else:
        (next(support.iterdir()) / "notes.txt").write_text("not a drawing")
    with pytest.raises(SystemExit) as exit:
        main(
            [
                str(protonet_run),
                "--support",
                str(support),
                "--query",
                str(characters / "query"),
                "--out",
                str(tmp_path / "preds.csv"),
            ]
        )
    err = capsys.readouterr().err
    assert (
        exit.value.code == 2 and err.startswith("metarun-predict: error: ") and err.count("\n") == 1
    )
    assert re.search(message, err)
    assert not (tmp_path / "preds.csv").exists()


def use_a_trained_model_block(markdown: str) -> str | None:
    """The ```python block of the section headed "Use a trained model", or None without one."""
    section = re.search(r"^#+ Use a trained model\s*$(.*?)(?=^#+ |\Z)", markdown, re.M | re.S)
    block = section and re.search(r"```python\n(.*?)```", section.group(1), re.S)
    return block.group(1) if block else None


def test_readme_use_a_trained_model_runs_as_written(protonet_run, characters, capsys):
    """docs/trained-model.md's "Use a trained model" section: its ```python block, run with RUN_DIR,
    SUPPORT (one folder of PNGs per class) and QUERY (a folder of PNGs) defined. README.md's section
    of that name, where it has a ```python block, shows the same code."""
    block = use_a_trained_model_block((REPO / "docs" / "trained-model.md").read_text())
    assert block, "docs/trained-model.md's 'Use a trained model' section has no ```python block"
    readme = use_a_trained_model_block((REPO / "README.md").read_text())
    assert readme in (None, block), "README.md's 'Use a trained model' example is not the docs' one"
    query = characters / "flat-query"
    if not query.exists():
        query.mkdir()
        for f in (characters / "query").glob("*/*.png"):
            shutil.copy(f, query / f"{f.parent.name}-{f.name}")
    support = str(characters / "support")
    exec(block, {"RUN_DIR": str(protonet_run), "SUPPORT": support, "QUERY": str(query)})
    assert capsys.readouterr().out
