"""Two CPU processes on gloo (torchrun) train like one process on the union of their tasks, resume
from their checkpoint, and meta-test on exactly the episodes one process would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metarun.checkpoint import load_checkpoint
from metarun.data.tasks import TaskBatch
from metarun.distributed import Processes
from metarun.trainer import Trainer
from tests.conftest import DATA_ROOT, REPO, compose_config

# SGD: Adam would turn the float noise of gradients that are zero in exact arithmetic (ProtoNet's
# distances ignore the last layer's bias) into full steps of lr that differ between any two sum orders.
TINY = (
    "device=cpu",
    "optimizer=sgd",
    "episode.meta_batch_size=4",
    "episode.n_query=3",
    "train.val_every=2",
    "train.val_episodes=10",
    "train.log_every=1",
    "eval.episodes=20",
    "eval.batch_size=5",
)
ALGORITHMS = {
    "protonet": ("algorithm=protonet",),
    "maml": (
        "algorithm=maml",
        "algorithm.first_order=false",
        "algorithm.adaptation_steps=1",
        "algorithm.eval_adaptation_steps=1",
    ),
}


def data(omniglot_root, omniglot_cache) -> tuple[str, ...]:
    return (
        f"dataset.root={omniglot_root}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.download=false",
    )


def torchrun(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m metarun OVERRIDES hydra.run.dir=RUN_DIR`, on the CPU."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "metarun",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
    env = {
        **os.environ,
        "METARUN_DATA": str(DATA_ROOT),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, omniglot_root, omniglot_cache):
    """{algorithm: run directory} of a 4-step run on 2 processes."""
    runs = {}
    for name, overrides in ALGORITHMS.items():
        runs[name] = tmp_path_factory.mktemp(f"ddp-{name}")
        torchrun(
            runs[name], *data(omniglot_root, omniglot_cache), *TINY, *overrides, "train.steps=4"
        )
    return runs


def one_process(name: str, omniglot_root, omniglot_cache, run_dir: Path) -> Trainer:
    cfg = compose_config(
        *data(omniglot_root, omniglot_cache), *TINY, *ALGORITHMS[name], "train.steps=4"
    )
    return Trainer(cfg, run_dir)


def cat(batches: list[TaskBatch]) -> TaskBatch:
    fields = ("support_x", "support_y", "query_x", "query_y", "classes")
    return TaskBatch(
        **{f: torch.cat([getattr(b, f) for b in batches]) for f in fields}, n_way=batches[0].n_way
    )


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_two_processes_train_like_one_process_on_the_union_of_their_tasks(
    name, two_process_runs, omniglot_root, omniglot_cache, tmp_path
):
    trainer = one_process(name, omniglot_root, omniglot_cache, tmp_path)
    start = {key: value.detach().clone() for key, value in trainer.learner.named_parameters()}
    ranks = [Processes(rank, 2) for rank in range(2)]
    generators = [torch.Generator().manual_seed(p.seed(trainer.cfg.seed)) for p in ranks]
    share = ranks[0].share(trainer.cfg.episode.meta_batch_size)
    logged = []
    for _ in range(4):
        batches = [trainer.samplers["train"].sample(share, g) for g in generators]
        assert not torch.equal(
            batches[0].support_x, batches[1].support_x
        )  # each rank draws its own tasks
        metrics = trainer.train_step(cat(batches))
        logged.append([metrics[key].item() for key in ("loss", "accuracy")])
    two = load_checkpoint(two_process_runs[name] / "checkpoints" / "last.pt")["learner"]
    for key, value in trainer.learner.named_parameters():
        # The same weights up to float32 sums in another order: 5e-8 of the gradient at the first
        # step, which four large SGD steps on an untrained Conv4 amplify to at most ~2e-3 of the
        # distance training moved the weights (ProtoNet).
        moved, apart = (value.detach() - start[key]).norm(), (two[key] - value.detach()).norm()
        assert moved > 0 and apart <= 1e-2 * moved, (key, apart.item(), moved.item())
    # The logged training loss and accuracy are the whole meta-batch's (both ranks' tasks), not rank 0's share.
    lines = [
        json.loads(line)
        for line in (two_process_runs[name] / "metrics.jsonl").read_text().splitlines()
    ]
    two_logged = [
        [line[key] for key in ("loss", "accuracy")] for line in lines if line["split"] == "train"
    ]
    assert len(two_logged) == 4
    torch.testing.assert_close(torch.tensor(two_logged), torch.tensor(logged), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_episodes_split_over_processes_give_exactly_the_one_process_evaluation(
    name, two_process_runs, omniglot_root, omniglot_cache, tmp_path
):
    run_dir = two_process_runs[name]
    trainer = one_process(name, omniglot_root, omniglot_cache, tmp_path)
    trainer.learner.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "best.pt")["learner"])
    one = trainer.evaluate("test", trainer.cfg.eval.episodes)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["processes"] == 2
    assert results["test_accuracy"] == one["accuracy"] and results["ci95"] == one["ci95"]
    assert json.loads((run_dir / "test_episodes.json").read_text())["values"] == one["per_episode"]


def test_two_process_run_resumes_from_its_checkpoint_to_the_same_end(
    two_process_runs, omniglot_root, omniglot_cache, tmp_path
):
    overrides = (*data(omniglot_root, omniglot_cache), *TINY, *ALGORITHMS["protonet"])
    torchrun(tmp_path, *overrides, "train.steps=2")
    assert set(load_checkpoint(tmp_path / "checkpoints" / "last.pt")["rng_per_rank"][1]) >= {
        "train_sampler"
    }
    torchrun(tmp_path, *overrides, "train.steps=4")
    straight = two_process_runs["protonet"]
    last = [load_checkpoint(d / "checkpoints" / "last.pt")["learner"] for d in (straight, tmp_path)]
    assert all(torch.equal(last[0][key], last[1][key]) for key in last[0])
    results = [json.loads((d / "results.json").read_text()) for d in (straight, tmp_path)]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]


def test_every_rank_draws_its_own_task_stream_from_a_cpu_generator():
    """A CPU generator keeps only the low 32 bits of its seed: the ranks' seeds must differ there."""
    seeds = [Processes(rank, 8).seed(0) for rank in range(8)]
    assert seeds[0] == 0 and len({seed % 2**32 for seed in seeds}) == 8
    draws = [torch.rand(4, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    assert all(not torch.equal(draws[0], other) for other in draws[1:])


def test_a_meta_batch_that_does_not_split_over_the_processes_is_one_line(
    omniglot_root, omniglot_cache, tmp_path
):
    from metarun.errors import MetarunError

    cfg = compose_config(*data(omniglot_root, omniglot_cache), *TINY, "episode.meta_batch_size=3")
    with pytest.raises(MetarunError, match="meta_batch_size=3 does not split over 2 processes"):
        Trainer(cfg, tmp_path, processes=Processes(0, 2))
    assert not any(tmp_path.iterdir())
