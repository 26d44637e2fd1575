"""Short real runs on Omniglot that the metarun-eval and metarun.load tests share: each is trained
once per test session, by the first module that asks for it (training is most of their time)."""

from __future__ import annotations

from pathlib import Path

from metarun.trainer import Trainer
from tests.conftest import compose_config

SHORT = (
    "device=cpu",
    "train.val_episodes=20",
    "train.log_every=20",
    "eval.episodes=60",
    "eval.batch_size=30",
    "eval.base_images=500",
)
RUNS = {
    # 20-way training episodes learn fastest (tests/test_trainer.py); tested 5-way.
    "protonet": (
        "algorithm=protonet",
        "episode=20w1s",
        "episode.meta_batch_size=1",
        "episode.n_query=5",
        "eval.n_way=5",
        "eval.n_query=15",
        "train.steps=120",
        "train.val_every=60",
    ),
    # Second-order MAML, one inner step, a 32-wide Conv4 and a high outer learning rate: 73% on
    # validation after 50 steps, where first-order MAML is still below 50% after 100.
    "maml": (
        "algorithm=maml",
        "model.hidden=32",
        "optimizer.lr=0.005",
        "episode.meta_batch_size=4",
        "episode.n_query=5",
        "train.steps=80",
        "train.val_every=40",
    ),
}
_trained: dict[str, tuple[Path, dict]] = {}


def trained_run(
    name: str, tmp_path_factory, omniglot_root: Path, omniglot_cache: Path
) -> tuple[Path, dict]:
    """(run directory, its results.json) of RUNS[name], trained on first use."""
    if name not in _trained:
        run_dir = tmp_path_factory.mktemp(name)
        cfg = compose_config(
            f"dataset.root={omniglot_root}",
            f"dataset.cache_dir={omniglot_cache}",
            "dataset.download=false",
            *SHORT,
            *RUNS[name],
        )
        _trained[name] = run_dir, Trainer(cfg, run_dir).run()
    return _trained[name]
