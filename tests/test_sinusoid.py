"""Sinusoid regression end to end: MAML adapts, the run reports MSE and draws adaptation.png, and the
learners that only classify refuse it in one line."""

from __future__ import annotations

import json

import pytest
import torch

from metarun.errors import MetarunError
from metarun.trainer import Trainer
from tests.conftest import compose_config
from tests.test_zoo import ALGORITHMS

REGRESSION = {
    "maml",
    "fomaml",
    "metasgd",
    "anil",
    "boil",
    "reptile",
}  # BOIL: MAML adapting the body


SMALL = ("device=cpu", "train.val_episodes=50", "eval.episodes=100", "train.log_every=50")


def sinusoid(*overrides: str):
    """Sinusoid tasks of 10 points for any algorithm, test-sized."""
    return compose_config(
        "dataset=sinusoid",
        "model=mlp",
        "episode.n_way=1",
        "episode.k_shot=10",
        "episode.n_query=10",
        *SMALL,
        *overrides,
    )


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory):
    """The paper's experiment, shortened to 1,000 meta-batches (about 15 s)."""
    run_dir = tmp_path_factory.mktemp("sinusoid")
    cfg = compose_config(
        "+experiment=maml_sinusoid", *SMALL, "train.steps=1000", "train.val_every=500"
    )
    trainer = Trainer(cfg, run_dir)
    return run_dir, trainer, trainer.run()


def test_maml_adapts_a_sinusoid_far_below_its_unadapted_error(maml_run):
    _, trainer, results = maml_run
    before = trainer.learner.eval_adaptation_steps
    trainer.learner.eval_adaptation_steps = 0
    unadapted = trainer.evaluate("test", 100)["mse"]
    trainer.learner.eval_adaptation_steps = before
    # 1,000 meta-batches, seed 0: MSE 0.77 after 10 steps against 3.09 unadapted (one curve for every task).
    assert results["test_mse"] < 0.35 * unadapted, (results["test_mse"], unadapted)


def test_a_regression_run_reports_mse_where_classification_reports_accuracy(maml_run):
    run_dir, _, results = maml_run
    assert {"test_mse", "best_val_mse", "ci95"} <= results.keys() and "test_accuracy" not in results
    assert results["batch_norm"] == "none"  # the MLP has none
    assert json.loads((run_dir / "results.json").read_text()) == results
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["split"] == "train"]
    assert train and all("mse" in line and "accuracy" not in line for line in train)
    assert all(
        line["support_mse_after"] < line["support_mse_before"] for line in train
    )  # the inner step helps
    assert [line["split"] for line in lines if "mse" in line][-1] == "test"
    png = (run_dir / "adaptation.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.mark.parametrize("algorithm", sorted(REGRESSION - {"maml"}))
def test_the_other_regression_learners_train_on_sinusoids(tmp_path, algorithm):
    trainer = Trainer(
        sinusoid(f"algorithm={algorithm}", "episode.meta_batch_size=4", "train.steps=5"), tmp_path
    )
    tasks = trainer.samplers["train"].sample(4, torch.Generator().manual_seed(0))
    losses = [trainer.train_step(tasks)["loss"].item() for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    with torch.no_grad():
        _, mse = trainer.learner.eval().evaluate(trainer.samplers["test"].episodes(0, 0, 3))
    assert mse.shape == (3,) and (mse > 0).all()


@pytest.mark.parametrize("algorithm", sorted(set(ALGORITHMS) - REGRESSION))
def test_learners_that_only_classify_refuse_sinusoids_in_one_line(tmp_path, algorithm):
    with pytest.raises(
        MetarunError, match="cannot learn sinusoid's regression tasks; use algorithm=maml"
    ) as error:
        Trainer(sinusoid(f"algorithm={algorithm}"), tmp_path / "run")
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()


def test_a_sinusoid_needs_a_backbone_for_numbers_not_images(tmp_path):
    from metarun.config import validate

    with pytest.raises(
        MetarunError,
        match=r"model.in_channels follows dataset.channels, which this config does not "
        r"set; .* dataset=sinusoid takes model=mlp",
    ):
        validate(sinusoid("model=conv4", "algorithm=maml"))
