"""`metarun-eval RUN_DIR [key=value ...]`: meta-test a trained run again, under other test settings.

Reads the run's config and the checkpoint it tested (`checkpoints/best.pt`, or last.pt for a run
with train.test_checkpoint=last; `checkpoint=best|last` chooses), applies the
overrides evaluation may change (metarun.saved_run: eval.*, dataset=/dataset.*, device=/device.*,
algorithm.eval_adaptation_steps, model.batch_norm), meta-tests it as the run built and tested it
(metarun.experiment), and writes `RUN_DIR/eval/<name>/results.json` and `test_episodes.json` in the
trainer's formats. Nothing else in RUN_DIR changes. Without overrides the numbers are the run's
own test, episode by episode. A run that has not finished (still training, stopped before its
test) is tested only with its checkpoint named, `checkpoint=best` or `checkpoint=last`.
A run trained with `eval.ensemble_top_k=K > 1` is tested as it was, its K best validations'
checkpoints together (`eval.ensemble_top_k=1`: best.pt alone; a smaller K: the best of them).

<name> is made from the overrides (`eval.n_way=20` -> `n_way=20`; `default` without any), or
chosen with `name=...`. Another dataset's test classes (`dataset=folder dataset.path=DIR`) are
the cross-domain protocol of Chen et al. (2019), "A Closer Look at Few-shot Classification": its
images are normalized with the training dataset's mean and std (`eval.normalization=target`: their own).

Bad input is one line, `metarun-eval: error: problem; fix`, with exit code 2 and nothing written.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

from metarun import run_dir as files
from metarun.checkpoint import load_checkpoint
from metarun.config import config_container
from metarun.errors import MetarunError, OneLineArgumentParser, warnings_as_lines
from metarun.evaluation import check_ensemble, ensemble_evaluate
from metarun.experiment import Experiment
from metarun.saved_run import CHANGEABLE, ensemble_members, open_run, restore
from metarun.score import in_results

OPTIONS = ("checkpoint", "name")  # metarun-eval's own key=value arguments, not config keys


def evaluate_run(run_dir: Path, arguments: list[str]) -> tuple[Path, dict[str, Any]]:
    """Meta-test the run under `arguments` (overrides, checkpoint=, name=); returns the folder
    written and its results.json."""
    options = {
        key: value for key, _, value in (a.partition("=") for a in arguments) if key in OPTIONS
    }
    overrides = [a for a in arguments if a.partition("=")[0] not in OPTIONS]
    checkpoint = options.get("checkpoint")  # None: the checkpoint a finished run tested
    name = options.get("name") or default_name(overrides, checkpoint or "best")
    check_name(name)
    experiment, state, checkpoint, _ = open_run(run_dir, overrides, checkpoint)
    started = time.perf_counter()
    cfg, score = experiment.cfg, experiment.score
    top_k, ensemble = cfg.eval.ensemble_top_k, {}
    if top_k > 1:
        test, ensemble = ensemble_test(run_dir, experiment, top_k, checkpoint)
    else:
        test = experiment.evaluate("test", cfg.eval.episodes)
    results = {
        **files.test_results(test, score, cfg, experiment.head_entries()),
        **ensemble,
        "checkpoint": checkpoint,
        "step": state.get("step"),
        "overrides": overrides,
        "wall_time_s": time.perf_counter() - started,
        "config": config_container(cfg),
    }
    out = files.eval_dir(run_dir, name)
    files.write_test(out, results, test, score, files.protocol_identity(cfg, experiment.dataset))
    return out, results


def ensemble_test(
    run_dir: Path, experiment: Experiment, top_k: int, checkpoint: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The test of eval.ensemble_top_k, as the trainer tests it (metarun.evaluation), and its
    record for results.json."""
    check_ensemble(top_k, experiment.tester, experiment.score, experiment.dataset.name)
    if checkpoint != "best":
        raise MetarunError(
            f"eval.ensemble_top_k={top_k} tests the {top_k} best validation checkpoints together, "
            f"and checkpoint={checkpoint} asks for that one; give eval.ensemble_top_k=1 to test it alone"
        )
    members = ensemble_members(run_dir, top_k)
    if len(members) < top_k:
        print(
            f"eval.ensemble_top_k={top_k}, but the run has kept only {len(members)} validation "
            f"checkpoints (steps {', '.join(str(m['step']) for m in members)}): the test averages those"
        )

    def load(member: dict[str, Any]) -> None:
        path = files.ensemble_member_file(run_dir, member["step"])
        state = load_checkpoint(path, experiment.device)
        restore(experiment.learner, state, path)
        experiment.give_base_statistics(state.get("base_statistics"), str(path))

    cfg = experiment.cfg.eval
    test = ensemble_evaluate(
        experiment.tester,
        members,
        load,
        experiment.samplers["test"],
        cfg.episodes,
        cfg.seed,
        cfg.batch_size,
        experiment.autocast,
    )
    return test, files.ensemble_entry(run_dir, top_k, members, experiment.score)


def default_name(overrides: list[str], checkpoint: str) -> str:
    """`n_way=20,split=background`: each override by its last key and, for a path, the last part
    of the value; `default` for none."""
    parts = []
    for override in overrides + ([f"checkpoint={checkpoint}"] if checkpoint != "best" else []):
        key, _, value = override.partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}={value.rstrip('/').rsplit('/', 1)[-1]}")
    return re.sub(r"[^\w.=,+-]", "_", ",".join(parts))[:120] or "default"


def check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or name.startswith("."):
        raise MetarunError(
            f"name={name} must be a folder name (no '/', not starting with '.'); give e.g. name=n_way20"
        )


def parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="metarun-eval",
        description="Meta-test a trained run again; writes RUN_DIR/eval/<name>/results.json and test_episodes.json.",
        epilog=f"Overrides evaluation may make: {CHANGEABLE}. Also checkpoint=best|last and name=<folder>.\n"
        "Examples: metarun-eval RUN eval.n_way=20 | eval.episode=20w1s | eval.head=logreg | dataset.split=background | "
        "dataset=folder dataset.path=DIR | algorithm.eval_adaptation_steps=10 | checkpoint=last",
    )
    p.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a run directory (outputs/<date>/<time>_...)"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="evaluation overrides, Hydra's syntax"
    )
    return p


def main(argv: Optional[list[str]] = None) -> None:
    warnings_as_lines("metarun-eval")
    args = parser().parse_args(argv)
    try:
        out, results = evaluate_run(args.run_dir, args.overrides)
    except MetarunError as e:
        print(f"metarun-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    score = in_results(results)
    test = {score.name: files.test_score(results, score), "ci95": results["ci95"]}
    members = results.get("ensemble", {}).get("members")
    tested = f"{len(members)} checkpoints together" if members else f"{results['checkpoint']}.pt"
    print(
        f"test {score.describe(test)} ({files.test_conditions(results)}, {tested}); "
        f"wrote {files.results_file(out)}"
    )


if __name__ == "__main__":
    main()
