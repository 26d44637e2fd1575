"""What a run directory holds: the one module that names its files and writes and reads its records.

    .hydra/config.yaml       the composed config the run trains with (hydra.yaml, overrides.yaml beside it)
    checkpoints/best.pt      the best validation checkpoint; last.pt the latest, to resume from
    checkpoints/top-step<N>.pt  with eval.ensemble_top_k=K > 1: the K best validations' checkpoints,
                             each named by its step (last.pt's "top_k" lists them with their scores)
    metrics.jsonl, tb/       each logged step's numbers, as JSON lines and TensorBoard events
    metrics.csv              the same rows as metrics.jsonl (logger=csv)
    loggers.json             the MLflow and W&B run ids a resumed run continues (logger=mlflow, wandb)
    results.json             the test (`test_<score>`, ci95, `best_val_<score>`, ...), written last
    test_episodes.json       each test episode's score, and the identity of those episodes
    failed.json              a failed run's error line and overrides (until it finishes)
    .metarun.lock            held by the process that trains the directory (metarun.lock)
    eval/<name>/             metarun-eval's results.json and test_episodes.json
    adaptation.png           a task dataset's figure (sinusoid)

Everything else names these through the functions here, and finds a results file's score with
`metarun.score`, so that the layout can change in one place.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from metarun.atomic import write_atomically, write_errors
from metarun.config import config_container, episode_shape
from metarun.data.contract import ClassDataset, ClassImages
from metarun.score import Score

HYDRA = ".hydra"
CHECKPOINTS = ("best", "last")
ENSEMBLE_MEMBER = "top-step{step}.pt"  # one of the eval.ensemble_top_k best validations
RESULTS = "results.json"
TEST_EPISODES = "test_episodes.json"
METRICS = "metrics.jsonl"
LOGGERS = "loggers.json"
METRICS_CSV = "metrics.csv"
FAILED = "failed.json"  # {"error": "<one line>", "overrides": ["key=value", ...]}
LOCK = ".metarun.lock"  # {"pid", "host", "started"} of the process training the directory
# What a run writes first or last: a folder holding one is a run (metarun-report's search).
MARKERS = (HYDRA, FAILED, RESULTS, METRICS)
# What training leaves beside .hydra/: a folder holding one but no config lost its record.
TRAINED = ("checkpoints", RESULTS, METRICS, TEST_EPISODES)


# -- where each file lies ---------------------------------------------------------------------
def config_file(run_dir: Path) -> Path:
    return Path(run_dir) / HYDRA / "config.yaml"


def overrides_file(run_dir: Path) -> Path:
    return Path(run_dir) / HYDRA / "overrides.yaml"


def hydra_record(run_dir: Path) -> Path:
    return Path(run_dir) / HYDRA


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_file(run_dir: Path, name: str) -> Path:
    """checkpoints/<name>.pt, name "best" or "last"."""
    return checkpoints_dir(run_dir) / f"{name}.pt"


def ensemble_member_file(run_dir: Path, step: int) -> Path:
    """checkpoints/top-step<step>.pt: the checkpoint of the validation at `step`, one of the
    eval.ensemble_top_k best. Named by its step, so a member is written once and never renamed
    when the ranking moves."""
    return checkpoints_dir(run_dir) / ENSEMBLE_MEMBER.format(step=step)


def ensemble_member_files(run_dir: Path) -> dict[int, Path]:
    """{step: path} of every checkpoints/top-step<N>.pt the directory holds."""
    prefix, suffix = ENSEMBLE_MEMBER.split("{step}")
    found = {}
    for path in checkpoints_dir(run_dir).glob(f"{prefix}*{suffix}"):
        step = path.name.removeprefix(prefix).removesuffix(suffix)
        if step.isdigit():
            found[int(step)] = path
    return found


def results_file(run_dir: Path) -> Path:
    return Path(run_dir) / RESULTS


def test_episodes_file(run_dir: Path) -> Path:
    return Path(run_dir) / TEST_EPISODES


def metrics_file(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS


def metrics_csv_file(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_CSV


def loggers_file(run_dir: Path) -> Path:
    """loggers.json: each tracker's run id (MLflow, W&B), so that a resumed run continues its run."""
    return Path(run_dir) / LOGGERS


def tensorboard_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "tb"


def failed_file(run_dir: Path) -> Path:
    return Path(run_dir) / FAILED


def lock_file(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK


EVAL = "eval"


def tests_folder(run_dir: Path) -> Path:
    """Where metarun-eval's tests of a run go, one folder each."""
    return Path(run_dir) / EVAL


def eval_dir(run_dir: Path, name: str) -> Path:
    """Where `metarun-eval ... name=<name>` writes its results."""
    return tests_folder(run_dir) / name


def tested_run(folder: Path) -> Optional[Path]:
    """The run directory whose eval/<name>/ `folder` is (metarun-eval wrote it), else None."""
    run = folder.parent.parent
    return run if folder.parent.name == EVAL and is_run_dir(run) else None


def figure_file(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / f"{name}.png"


def is_run_dir(path: Path) -> bool:
    """A folder that a run wrote into (MARKERS)."""
    return any((Path(path) / name).exists() for name in MARKERS)


def holds_training_files(path: Path) -> bool:
    return any((Path(path) / name).exists() for name in TRAINED)


def lock_holder(run_dir: Path) -> dict[str, Any]:
    """The lock file's {"pid", "host", "started"}; OSError or ValueError when it cannot be read."""
    return json.loads(lock_file(run_dir).read_text())


# -- writers ----------------------------------------------------------------------------------
def write_json(path: Path, record: dict[str, Any]) -> None:
    write_atomically(path, lambda f: f.write(json.dumps(record, indent=2).encode() + b"\n"))


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    """The record Hydra would write to .hydra/, written only once the run can really start."""
    from hydra.core.hydra_config import HydraConfig

    record = hydra_record(run_dir)
    with write_errors(record):
        record.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, config_file(run_dir))
        if HydraConfig.initialized():
            hydra_cfg = HydraConfig.get()
            OmegaConf.save(hydra_cfg, record / "hydra.yaml")
            OmegaConf.save(
                OmegaConf.create(list(hydra_cfg.overrides.task)), overrides_file(run_dir)
            )


def test_results(
    test: dict[str, Any], score: Score, cfg: DictConfig, head: dict[str, Any]
) -> dict[str, Any]:
    """A test's entries in results.json: the score, its CI, the episodes, the loss, the batch
    norm that produced them (transductive "task", inductive "running", or "none" for an MLP), and
    `head` (metarun.experiment.Experiment.head_entries: the head's name, whether it is
    transductive)."""
    return {
        f"test_{score.name}": test[score.name],
        "ci95": test["ci95"],
        "episodes": test["episodes"],
        "test_loss": test["loss"],
        "batch_norm": OmegaConf.select(cfg, "model.batch_norm", default="none"),
        **head,
    }


def test_conditions(results: dict[str, Any]) -> str:
    """`600 episodes, batch_norm=task, head=centroid, transductive`: how a test was scored, for
    its final line (results.json from before heads: no head)."""
    parts = [f"{results['episodes']} episodes", f"batch_norm={results['batch_norm']}"]
    if "head" in results:
        parts.append(f"head={results['head']}")
        parts.append("transductive" if results["transductive"] else "inductive")
    return ", ".join(parts)


def ensemble_entry(
    run_dir: Path, top_k: int, members: list[dict[str, Any]], score: Score
) -> dict[str, Any]:
    """results.json's record of an ensemble test: eval.ensemble_top_k and the checkpoints averaged,
    best first, each with its step and validation score (`val_<score>`)."""
    return {
        "ensemble": {
            "top_k": top_k,
            "members": [
                {
                    "step": member["step"],
                    "checkpoint": str(
                        ensemble_member_file(run_dir, member["step"]).relative_to(run_dir)
                    ),
                    f"val_{score.name}": member["score"],
                }
                for member in members
            ],
        }
    }


def best_val_entry(score: Score, best_val: float) -> dict[str, float]:
    return {f"best_val_{score.name}": best_val}


def score_entries(score: Score, test: float, best_val: float) -> dict[str, float]:
    """{"test_<score>": ..., "best_val_<score>": ...}, as results.json holds them."""
    return {f"test_{score.name}": test, **best_val_entry(score, best_val)}


def write_test(
    directory: Path, results: dict[str, Any], test: dict[str, Any], score: Score, identity: dict
) -> None:
    """results.json, and test_episodes.json: each test episode's score. Runs with the same
    identity met the same episodes, so a report can compare them episode by episode."""
    write_json(results_file(directory), results)
    record = {"score": score.name, "identity": identity, "values": test["per_episode"]}
    write_json(test_episodes_file(directory), record)


def record_failure(run_dir: Path, error: str, overrides: list[str]) -> None:
    """failed.json in the run directory: the error line and the overrides that produced it."""
    write_json(failed_file(run_dir), {"error": error, "overrides": overrides})


def clear_failure(run_dir: Path) -> None:
    """A run that finishes removes the failed.json of an earlier attempt in its directory."""
    failed_file(run_dir).unlink(missing_ok=True)


# -- readers ----------------------------------------------------------------------------------
def failed_with(run_dir: Path) -> Optional[str]:
    """The error line of the run's failed.json (first 200 characters), or None."""
    try:
        return str(json.loads(failed_file(run_dir).read_text())["error"])[:200]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def best_val(results: dict[str, Any], score: Score) -> Any:
    """results.json's best validation score (of the score it was tested by)."""
    return results.get(f"best_val_{score.name}")


def test_score(results: dict[str, Any], score: Score) -> Any:
    return results.get(f"test_{score.name}")


# -- which episodes a test met ----------------------------------------------------------------
def protocol_identity(cfg: DictConfig, dataset: Any) -> dict[str, Any]:
    """What fixes the test episodes: the dataset and its split, the episodes' shape, count and seed,
    and a class dataset's test images by content. The machine-local keys (where the data lies)
    are left out and the content stands in for them: a moved copy of the same images still
    pairs, other images under the same settings (a `folder`'s `path`) never do."""
    local = dataset.machine_local
    data = {k: v for k, v in config_container(cfg.dataset).items() if k not in local}
    n_way, k_shot, n_query = episode_shape(cfg, "test")
    identity = {
        "dataset": data,
        "split": "test",
        "n_way": n_way,
        "k_shot": k_shot,
        "n_query": n_query,
        "episodes": cfg.eval.episodes,
        "seed": cfg.eval.seed,
        "support_augment": cfg.eval.support_augment,
    }
    if isinstance(dataset, ClassDataset):  # a task dataset (sinusoid) is its config alone
        identity["test_images"] = content_fingerprint(dataset.part("test"))
    return identity


def content_fingerprint(part: ClassImages) -> dict[str, Any]:
    """A part's images by content: its class and image counts, and a SHA-256 of the class names, the
    images per class and every pixel (about 1.5 GB/s: a fifth of a second for mini-ImageNet's test part)."""
    layout = [list(part.names), part.counts.tolist(), list(part.image_shape)]
    digest = hashlib.sha256(json.dumps(layout).encode())
    digest.update(memoryview(part.images.cpu().contiguous().numpy()).cast("B"))
    return {"classes": part.n_classes, "images": len(part.images), "sha256": digest.hexdigest()}
