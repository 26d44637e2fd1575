"""The sweep report (`metarun-report DIR [DIR...]`): one table of every run under the folders, and a
comparison of two rows.

A run directory is a folder holding `.hydra/`, `failed.json`, `results.json` or `metrics.jsonl`: a
single run, a Hydra multirun's SWEEP/0, SWEEP/1, ..., a SLURM sweep's jobs (hidden folders such as
`.submitit/` are skipped). From each, read and never written:

  .hydra/overrides.yaml  the key=value overrides of its command line: they name its configuration
  .hydra/config.yaml     the composed config (train.steps, a running run's target)
  results.json           test_<score>, ci95, best_val_<score>, steps, wall_time_s     (finished)
  test_episodes.json     {"score", "identity": {...}, "values": [per-episode score]}   (finished)
  metrics.jsonl          {"step", "split": "val", "<score>": ...} lines; a cut-off line is skipped
  failed.json            {"error": one line, "overrides": [...]}                       (failed)

Runs whose overrides differ only in `seed` share a row. A record that is cut off or not what the
trainer writes (a truncated results.json, no `.hydra/`) is named in the run's status and in a
warning line, never taken for a finished run's numbers: a run whose results.json does not hold a
test score is "damaged". report.md, report.csv and curves.png go into the first DIR; the table is
printed. Exit code: 2 for a bad argument (nothing is written), 1 when any run failed or is damaged
(the report is still written), else 0.

Two rows are compared by B − A (metarun.stats). A sweep table asks whether configuration B is
better than A, and a run's score moves with its seed (initial weights, training tasks) by an offset
that is the same on every test episode, so a test over episodes cannot see it: the seed is the
unit. With 2 or more finished seeds in both rows, each run is its mean score over the test episodes
both rows share (their difficulty, the same for every run, cancels in B − A); rows that ran the
same seeds are paired by seed (a seed fixes the initial weights and the training tasks, so the
pairing removes the luck two runs of one seed share, and is valid where they share none, at the
cost of degrees of freedom: n − 1), other rows are compared by Welch's t-test. A t-test rather than
a bootstrap: resampling 2 to 5 seeds undercovers (3 seeds have 10 distinct resamples). With one
seed in a row there is no seed-to-seed variance to estimate: its episodes are paired instead, which
compares trained models on these episodes, and the report says so.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import yaml

from metarun import run_dir as files
from metarun.errors import MetarunError
from metarun.score import MSE, Score, in_results, named
from metarun.stats import Difference, mean_and_std, paired_difference, welch_difference

STATUSES = ("finished", "running", "failed", "damaged")
SPREAD_NOTE = (
    "± is the std over a row's finished seeds (ddof=1); for a row of one finished run, its 95% CI over "
    "the test episodes, which leaves out seed-to-seed variance; accuracy in %."
)


@dataclass
class Run:
    """What one run directory says about itself; scores are fractions (accuracy) or raw (mse)."""

    path: Path
    overrides: dict[str, str]
    status: str  # one of STATUSES
    score: Optional[Score] = None  # what results.json holds under test_<name> (metarun.score)
    test: Optional[float] = None
    ci95: Optional[float] = None
    best_val: Optional[float] = None
    steps: Optional[int] = None  # results.json's, else the last step metrics.jsonl logged
    target_steps: Optional[int] = None  # train.steps
    wall_time_s: Optional[float] = None
    error: Optional[str] = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val score)
    episodes: Optional[dict[str, Any]] = None  # test_episodes.json, when it holds a list of scores
    seed: Optional[str] = None  # its `seed` override, else its composed config's
    recorded: bool = True  # its overrides are known (.hydra/overrides.yaml, or failed.json's)
    head: Optional[str] = None  # the head its test was scored with (results.json), if it says
    transductive: Optional[bool] = None  # whether that test used the queries jointly
    init: Optional[str] = None  # the chain of runs its backbone started from (model.init)
    problems: list[str] = field(
        default_factory=list
    )  # one line each: a record cut off, absent or malformed


@dataclass
class Row:
    """One configuration: the runs whose overrides are equal once `seed` is left out (a run whose
    overrides are unknown is a row of its own)."""

    number: int
    overrides: dict[str, str]
    runs: list[Run]

    @property
    def recorded(self) -> bool:
        return all(run.recorded for run in self.runs)


# -- reading runs ---------------------------------------------------------------------------------
def find_runs(dirs: list[Path]) -> list[Run]:
    """Every run at or below `dirs`, each once, in natural order (SWEEP/2 before SWEEP/10)."""
    runs, seen = [], set()
    for top in dirs:
        if not top.is_dir():
            raise MetarunError(
                f"{top} is not a directory; give a run or sweep folder, e.g. multirun/2024-05-01/12-00-00"
            )
        found = list(run_dirs(top))
        if not found:
            raise MetarunError(
                f"{top} holds no runs (no .hydra/, failed.json, results.json or metrics.jsonl "
                "below it); give the folder of a run or a sweep"
            )
        runs += [read_run(path) for path in found if path.resolve() not in seen]
        seen.update(path.resolve() for path in found)
    return runs


VAL_KEYS = ("step", "split", "loss")  # a validation line's keys besides its score


def run_dirs(top: Path) -> Iterator[Path]:
    """The runs at or below `top`, each followed by the tests metarun-eval made of it (RUN/eval/*)."""
    if files.is_run_dir(top):
        yield top
        tests = files.tests_folder(top)
        if tests.is_dir():
            yield from (p for p in subfolders(tests) if files.is_run_dir(p))
        return
    for child in subfolders(top):
        yield from run_dirs(child)


def subfolders(top: Path) -> list[Path]:
    """`top`'s folders in natural order (2 before 10), hidden ones left out."""
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]
    return sorted(
        (p for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural
    )


def read_run(path: Path) -> Run:
    """What `path` says about itself; a damaged or missing record is a problem line, never an exception."""
    problems: list[str] = []
    failed = read_record(files.failed_file(path), json.loads, dict, problems)
    results = read_record(files.results_file(path), json.loads, dict, problems)
    episodes = read_record(files.test_episodes_file(path), json.loads, dict, problems)
    listed = read_record(files.overrides_file(path), yaml.safe_load, list, problems)
    config = read_record(files.config_file(path), yaml.safe_load, dict, problems) or {}
    if listed is None and isinstance(failed, dict) and isinstance(failed.get("overrides"), list):
        listed = failed["overrides"]
    tested_again = is_eval_dir(path, results)
    if tested_again:  # RUN/eval/<name>: metarun-eval's overrides of the run it tested
        listed = [f"run={path.parent.parent.name}", *results["overrides"]]
    recorded = listed is not None
    if not recorded and not files.hydra_record(path).exists() and not tested_again:
        problems.append("no .hydra/ record, so its overrides are unknown: it is a row of its own")
    elif not recorded and not any(p.startswith(".hydra/overrides.yaml") for p in problems):
        problems.append(
            "no .hydra/overrides.yaml, so its overrides are unknown: it is a row of its own"
        )
    results = results or {}
    metrics = read_metrics(files.metrics_file(path))
    logged = (k for m in metrics if m.get("split") == "val" for k in m if k not in VAL_KEYS)
    score = in_results(results) or named((episodes or {}).get("score")) or named(next(logged, None))
    test = number(files.test_score(results, score)) if score else None
    if failed is not None:
        status = "failed"
    elif files.results_file(path).exists():
        status = "finished" if test is not None else "damaged"
        if status == "damaged" and not any(p.startswith(files.RESULTS) for p in problems):
            problems.append("results.json holds no test score")
    else:
        status = "running"
    if episodes is not None and not is_scores(episodes.get("values")):
        problems.append(
            "test_episodes.json holds no list of episode scores; the run is left out of comparisons"
        )
        episodes = None
    overrides = parse_overrides(listed or [])
    run = Run(
        path,
        overrides,
        status,
        score=score,
        episodes=episodes,
        recorded=recorded,
        problems=problems,
    )
    run.curve = [
        (m["step"], m[score.name])
        for m in metrics
        if score
        and m.get("split") == "val"
        and is_step(m.get("step"))
        and number(m.get(score.name)) is not None
    ]
    run.test, run.ci95 = test, number(results.get("ci95"))
    if isinstance(results.get("head"), str):
        run.head, run.transductive = results["head"], bool(results.get("transductive"))
    run.init = init_chain(results)
    run.best_val = number(files.best_val(results, score)) if score else None
    if run.best_val is None and run.curve:
        run.best_val = score.best([value for _, value in run.curve])
    steps = results.get("steps")
    run.steps = (
        steps
        if is_step(steps)
        else max((m["step"] for m in metrics if is_step(m.get("step"))), default=None)
    )
    train = config.get("train")
    run.target_steps = (
        train.get("steps") if isinstance(train, dict) and is_step(train.get("steps")) else None
    )
    run.wall_time_s = number(results.get("wall_time_s"))
    composed = config or (results["config"] if isinstance(results.get("config"), dict) else {})
    seed = overrides.get("seed", composed.get("seed"))
    run.seed = None if seed is None else str(seed)
    if failed is not None:
        error = str(failed.get("error") or "").strip().splitlines()
        damaged = [p for p in problems if p.startswith(files.FAILED)]
        run.error = error[0] if error else damaged[0] if damaged else "(failed.json gives no error)"
        problems[:] = [p for p in problems if p not in damaged]
    return run


def is_eval_dir(path: Path, results: Any) -> bool:
    """A folder metarun-eval wrote (RUN/eval/<name>/, results.json with the overrides it applied)."""
    return (
        isinstance(results, dict)
        and isinstance(results.get("overrides"), list)
        and files.tested_run(path) is not None
    )


def read_record(path: Path, parse: Callable[[str], Any], kind: type, problems: list[str]) -> Any:
    """`path` parsed, or None: absent (nothing said), or cut off or malformed (a line in `problems`)."""
    if not path.exists():
        return None
    name = (
        path.relative_to(path.parent.parent).as_posix()
        if path.parent.name == files.HYDRA
        else path.name
    )
    try:
        item = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: JSON's errors and undecodable bytes
        item = None
    if isinstance(item, kind):
        return item
    what = (
        "a JSON object"
        if kind is dict and path.suffix == ".json"
        else f"a YAML {'list' if kind is list else 'mapping'}"
    )
    problems.append(
        f"{name} is cut off or not {what}"
        + ("; its numbers are left out" if path.name == files.RESULTS else "")
    )
    return {} if kind is dict and path.name == files.FAILED else None


def number(value: Any) -> Optional[float]:
    """`value` if it is an int or float (not a bool), else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_scores(values: Any) -> bool:
    return isinstance(values, list) and all(number(v) is not None for v in values)


def parse_overrides(overrides: list[Any]) -> dict[str, str]:
    """`['+model.depth=4', 'seed=1']` -> {'model.depth': '4', 'seed': '1'}; `hydra.*` settings are left out."""
    pairs = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        if not key.lstrip("+").startswith("hydra."):
            pairs[key.lstrip("+")] = value
    return pairs


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's lines; one that does not parse (the last line of a killed run) is skipped."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace") if path.is_file() else ""
    except OSError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict):
            lines.append(item)
    return lines


# -- rows -----------------------------------------------------------------------------------------
def group(runs: list[Run]) -> list[Row]:
    """Runs whose overrides are equal apart from `seed`, one row each, numbered from 1 in run order;
    a run whose overrides are unknown, a row of its own."""
    rows: dict[tuple, Row] = {}
    for run in runs:
        config = {key: value for key, value in run.overrides.items() if key != "seed"}
        key = tuple(sorted(config.items())) if run.recorded else ("unrecorded", str(run.path))
        rows.setdefault(key, Row(len(rows) + 1, config, [])).runs.append(run)
    return list(rows.values())


def differing(overrides: list[dict[str, str]]) -> list[str]:
    """The keys whose value (or absence) is not the same in every dict, in order of first appearance."""
    keys = dict.fromkeys(key for pairs in overrides for key in pairs)
    return [key for key in keys if len({pairs.get(key) for pairs in overrides}) > 1]


def init_chain(results: dict[str, Any], depth: int = 10) -> Optional[str]:
    """`RUN_B <- RUN_A`: the runs whose backbones a run started from (results.json's `init`, and
    theirs), each by the last two parts of its path; None for a run that started from scratch."""
    names = []
    while isinstance(results.get("init"), dict) and len(names) < depth:
        source = results["init"]
        where = source.get("run") or source.get("checkpoint")
        if not isinstance(where, str):
            break
        names.append("/".join(Path(where).parts[-2:]))
        if not source.get("run"):
            break
        source_results = files.results_file(Path(source["run"]))
        results = (
            read_record(source_results, json.loads, dict, []) if source_results.exists() else {}
        )
        results = results or {}
    return " <- ".join(names) or None


def summarize(row: Row) -> dict[str, Any]:
    """A row's numbers, as report.csv holds them (None where there is no value)."""
    tested = [run for run in row.runs if run.test is not None]
    mean, std = mean_and_std([run.test for run in tested]) if tested else (None, None)
    # Best validation over the runs that have a test score; over all runs only while none has.
    vals = [run.best_val for run in tested or row.runs if run.best_val is not None]
    steps = [run.steps for run in row.runs if run.steps is not None]
    times = [run.wall_time_s for run in row.runs if run.wall_time_s is not None]
    return {
        "score": next((run.score for run in row.runs if run.score), None),
        "head": head_text(row),
        "init": " / ".join(dict.fromkeys(run.init for run in row.runs if run.init)) or None,
        "test_mean": mean,
        "test_std": std if len(tested) > 1 else None,
        "test_ci95": tested[0].ci95 if len(tested) == 1 else None,
        "n_seeds": len(tested),
        "best_val_mean": float(np.mean(vals)) if vals else None,
        "steps_min": min(steps, default=None),
        "steps_max": max(steps, default=None),
        "wall_time_s": float(np.mean(times)) if times else None,
        **{status: sum(run.status == status for run in row.runs) for status in STATUSES},
        "error": next((run.error for run in row.runs if run.error), None),
        "problems": "; ".join(
            dict.fromkeys(problem for run in row.runs for problem in run.problems)
        )
        or None,
    }


def head_text(row: Row) -> Optional[str]:
    """`logreg` or `ptmap, transductive`: the head a row's tests were scored with."""
    heads = {(run.head, run.transductive) for run in row.runs if run.head is not None}
    if not heads:
        return None
    return " / ".join(
        f"{head}, transductive" if transductive else head for head, transductive in sorted(heads)
    )


def status_text(row: Row, s: dict[str, Any]) -> str:
    if len(row.runs) > 1:
        text = ", ".join(f"{s[status]} {status}" for status in STATUSES if s[status])
    else:
        run = row.runs[0]
        text = run.status
        if run.status == "running" and run.steps is not None:
            text += f" (step {run.steps}" + (f"/{run.target_steps})" if run.target_steps else ")")
    notes = [note for note in (s["error"], s["problems"]) if note]
    return f"{text}: {'; '.join(notes)}" if notes else text


def fmt_score(
    score: Optional[Score], value: Optional[float], spread: Optional[float] = None
) -> str:
    return (score or MSE).table(value, spread)  # a row without a score has no value either


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(round(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def table(rows: list[Row], columns: list[str], summaries: list[dict[str, Any]]) -> str:
    """The markdown table: one line per row, the differing overrides first."""
    scores = " / ".join(dict.fromkeys(s["score"].label for s in summaries if s["score"]))
    scores = scores or "score"
    seeds = any(len(row.runs) > 1 for row in rows)
    heads = any(s["head"] for s in summaries)
    inits = any(s["init"] for s in summaries)
    header = [
        "#",
        *columns,
        *(["head"] * heads),
        *(["init"] * inits),
        f"test {scores}",
        f"best val {scores}",
        *(["seeds"] * seeds),
        "steps",
        "wall time",
        "status",
    ]
    lines = [header, ["---"] * len(header)]
    for row, s in zip(rows, summaries):
        steps = (
            "-"
            if s["steps_min"] is None
            else str(s["steps_min"])
            if s["steps_min"] == s["steps_max"]
            else f"{s['steps_min']}–{s['steps_max']}"
        )
        lines.append(
            [
                str(row.number),
                *(row.overrides.get(key, "-") if row.recorded else "?" for key in columns),
                *([s["head"] or "-"] * heads),
                *([s["init"] or "-"] * inits),
                fmt_score(
                    s["score"],
                    s["test_mean"],
                    s["test_std"] if s["test_std"] is not None else s["test_ci95"],
                ),
                fmt_score(s["score"], s["best_val_mean"]),
                *([str(s["n_seeds"])] * seeds),
                steps,
                fmt_duration(s["wall_time_s"]),
                status_text(row, s),
            ]
        )
    return "\n".join(
        "| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines
    )


# -- the paired comparison ------------------------------------------------------------------------
def select(rows: list[Row], spec: str) -> Row:
    """A row by its number in the table (`2`) or by an override only it holds (`optimizer.lr=0.001`)."""
    if spec.isdigit():
        if 1 <= int(spec) <= len(rows):
            return rows[int(spec) - 1]
        raise MetarunError(
            f"--compare {spec}: the table has rows 1 to {len(rows)}; give one of those numbers"
        )
    key, sep, value = spec.partition("=")
    matches = [row for row in rows if sep and row.overrides.get(key.lstrip("+")) == value]
    if not matches:
        raise MetarunError(
            f"--compare {spec}: no row has that override; give a row number (1 to {len(rows)}) "
            "or a key=value shown in the table"
        )
    if len(matches) > 1:
        raise MetarunError(
            f"--compare {spec}: rows {', '.join(str(r.number) for r in matches)} all have it; "
            "give a row number instead"
        )
    return matches[0]


def chosen_pair(rows: list[Row], compare: Optional[list[str]]) -> Optional[tuple[Row, Row]]:
    """The rows --compare names, else the only two rows there are, else None."""
    if compare is None:
        return (rows[0], rows[1]) if len(rows) == 2 else None
    a, b = (select(rows, spec) for spec in compare)
    if a is b:
        raise MetarunError(
            f"--compare {' '.join(compare)}: both select row {a.number}; choose two different rows"
        )
    return a, b


@dataclass
class Comparison:
    """B − A and how it was reached: `unit` "seed" (paired by seed, or Welch's) or "episode"."""

    difference: Difference
    unit: str
    paired: bool
    episodes: int  # test episodes both rows share
    seeds: tuple[list[str], list[str]]  # A's and B's finished seeds


def shared_episodes(a: Row, b: Row) -> dict[int, list[Run]] | str:
    """Each row's finished runs, all tested on the same episodes; or why the two cannot be compared."""
    finished = {row.number: [run for run in row.runs if run.status == "finished"] for row in (a, b)}
    for row in (a, b):
        if not finished[row.number]:
            return f"row {row.number} has no finished run"
        missing = next((run for run in finished[row.number] if run.episodes is None), None)
        if missing:
            why = "damaged" if files.test_episodes_file(missing.path).exists() else "absent"
            return f"the test_episodes.json of {missing.path} is {why}"
    tested = [run.episodes for runs in finished.values() for run in runs]
    identities = [episodes.get("identity") for episodes in tested]
    if None in identities or any(identity != identities[0] for identity in identities):
        return "they were not tested on the same episodes (the identities in their test_episodes.json differ)"
    lengths = sorted({len(episodes["values"]) for episodes in tested})
    if len(lengths) > 1:
        return f"they were not tested on the same episodes ({' and '.join(map(str, lengths))} episodes)"
    if lengths[0] == 0:
        return "their test_episodes.json hold no episodes"
    return finished


def compare(a: Row, b: Row) -> Comparison | str:
    """B − A with the seed as the unit where both rows have 2 or more finished seeds (paired by seed
    when they ran the same ones, else Welch's), else paired over the episodes; or why not."""
    finished = shared_episodes(a, b)
    if isinstance(finished, str):
        return finished
    runs_a, runs_b = finished[a.number], finished[b.number]
    n_episodes = len(runs_a[0].episodes["values"])
    seeds_a, seeds_b = ([run.seed for run in runs] for runs in (runs_a, runs_b))
    seeds = tuple(["?" if seed is None else seed for seed in row] for row in (seeds_a, seeds_b))
    if min(len(runs_a), len(runs_b)) >= 2:
        means = [
            [float(np.mean(run.episodes["values"])) for run in runs] for runs in (runs_a, runs_b)
        ]
        # The same seeds, each once in each row (one seed's run given twice, from two folders, is no pair).
        same = (
            None not in seeds_a
            and len(set(seeds_a)) == len(seeds_a)
            and sorted(seeds_a) == sorted(seeds_b)
        )
        if same:
            a_by_seed, b_by_seed = dict(zip(seeds_a, means[0])), dict(zip(seeds_b, means[1]))
            order = sorted(seeds_a, key=natural_key)
            difference = paired_difference(
                [a_by_seed[seed] for seed in order], [b_by_seed[seed] for seed in order]
            )
        else:
            difference = welch_difference(*means)
        return Comparison(difference, "seed", same, n_episodes, seeds)
    if n_episodes < 2:
        return "fewer than 2 test episodes"
    a_values, b_values = (
        np.mean([run.episodes["values"] for run in runs], axis=0) for runs in (runs_a, runs_b)
    )
    return Comparison(paired_difference(a_values, b_values), "episode", True, n_episodes, seeds)


def natural_key(text: Any) -> list:
    """'seed 2' before 'seed 10'."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(text))]


def comparison(a: Row, b: Row, label: dict[int, str], score: Optional[Score]) -> list[str]:
    """The report's comparison section: B − A with its 95% CI and t-test, or a note why there is none."""
    lines = [
        "## Comparison",
        "",
        f"A = row {a.number} ({label[a.number]}), B = row {b.number} ({label[b.number]})",
        "",
    ]
    result = compare(a, b)
    if isinstance(result, str):
        return lines + [f"No test of B − A: {result}. Compare their ± in the table instead."]
    lines += transductive_note(a, b)
    d, name = result.difference, score.name if score else "score"
    seeds_a, seeds_b = result.seeds
    shared = f"the {result.episodes} test episodes both rows share"
    if result.unit == "seed" and result.paired:
        how = (
            f"Seed as the unit: each run's mean {name} over {shared}, paired by seed (seeds "
            f"{', '.join(sorted(seeds_a, key=natural_key))} in both rows): a paired t-test over "
            f"{len(seeds_a)} seeds."
        )
        df = f"t with {d.df:.0f} df"
    elif result.unit == "seed":
        how = (
            f"Seed as the unit: each run's mean {name} over {shared}; the rows ran different seeds "
            f"({', '.join(sorted(seeds_a, key=natural_key))} in A, {', '.join(sorted(seeds_b, key=natural_key))} "
            f"in B): Welch's t-test over {len(seeds_a)} and {len(seeds_b)} runs."
        )
        df = f"Welch's t with {d.df:.1f} df"
    else:
        how = (
            f"Paired over {shared}, each episode's {name} averaged over a row's finished seeds "
            f"({len(seeds_a)} in A, {len(seeds_b)} in B): a paired t-test over episodes."
        )
        df = f"t with {d.df:.0f} df"
    lines += [
        how,
        "",
        (
            f"B − A = {100 * d.mean:+.2f} ± {100 * d.ci95:.2f} {score.difference()}"
            if score and score.percent
            else f"B − A = {d.mean:+.4g} ± {d.ci95:.2g} {name}"
        )
        + f" (95% CI, {df}); p = {d.p:.2g}"
        + (f"; {score.direction()}." if score and not score.higher_is_better else "."),
    ]
    if result.unit == "episode":
        single = " and ".join(
            side for side, seeds in (("A", seeds_a), ("B", seeds_b)) if len(seeds) == 1
        )
        lines += [
            "",
            f"With one seed in {single}, this compares trained models on these episodes and leaves out "
            "seed-to-seed variance: it does not tell whether one configuration is better than the other. "
            "Run 2 or more seeds per row (e.g. seed=0,1,2) for that.",
        ]
    return lines


def transductive_note(a: Row, b: Row) -> list[str]:
    """A line when one row's test used the queries jointly and the other's did not."""
    modes = [
        {run.transductive for run in row.runs if run.transductive is not None} for row in (a, b)
    ]
    if any(len(mode) != 1 for mode in modes) or modes[0] == modes[1]:
        return []
    side = "A" if True in modes[0] else "B"
    return [
        f"{side} is transductive (its head or its batch norm used each episode's queries "
        f"together) and the other row inductive: the difference includes that advantage.",
        "",
    ]


# -- outputs --------------------------------------------------------------------------------------
def write_csv(
    path: Path, rows: list[Row], columns: list[str], summaries: list[dict[str, Any]]
) -> None:
    """report.csv: the table's rows, one value per column, scores as fractions (not %)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", *columns, *summaries[0]])
        for row, s in zip(rows, summaries):
            writer.writerow(
                [
                    row.number,
                    *(row.overrides.get(key, "") for key in columns),
                    *("" if value is None else csv_value(value) for value in s.values()),
                ]
            )


def csv_value(value: Any) -> Any:
    return value.name if isinstance(value, Score) else value


def plot_curves(path: Path, rows: list[Row], label: dict[Path, str]) -> None:
    """curves.png: each run's validation score against step, coloured by its row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row in rows:
        for run in row.runs:
            if run.curve:
                scale = run.score.scale
                ax.plot(
                    [step for step, _ in run.curve],
                    [scale * value for _, value in run.curve],
                    marker=".",
                    color=f"C{(row.number - 1) % 10}",
                    label=label[run.path],
                )
    names = dict.fromkeys(run.score.label for row in rows for run in row.runs if run.curve)
    ax.set_xlabel("step")
    ax.set_ylabel("validation " + " / ".join(names))
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no validation scores logged yet", ha="center", transform=ax.transAxes)
    fig.savefig(path, dpi=110, bbox_inches="tight")


# -- the report -----------------------------------------------------------------------------------
def read_report(dirs: list[Path], compare: Optional[list[str]]) -> tuple[list[Run], list[Row], Any]:
    """The runs under `dirs`, their rows and the pair of rows to compare (None: no comparison);
    a bad argument is a MetarunError, before anything is written."""
    runs = find_runs(dirs)
    rows = group(runs)
    return runs, rows, chosen_pair(rows, compare)


def write_report(dirs: list[Path], runs: list[Run], rows: list[Row], pair: Any) -> tuple[str, int]:
    """report.md, report.csv and curves.png in the first of `dirs`; returns the printed text and
    the exit code: 1 if any run failed or is damaged, else 0."""
    out = dirs[0]
    columns = differing([row.overrides for row in rows if row.recorded])
    summaries = [summarize(row) for row in rows]
    run_keys = differing([run.overrides for run in runs if run.recorded])
    run_label = {
        run.path: " ".join(f"{k}={run.overrides[k]}" for k in run_keys if k in run.overrides)
        or run.path.name
        for run in runs
    }
    row_label = {
        row.number: " ".join(f"{k}={row.overrides[k]}" for k in columns if k in row.overrides)
        or "defaults"
        if row.recorded
        else os.path.relpath(row.runs[0].path, out)
        for row in rows
    }
    body = [table(rows, columns, summaries), "", SPREAD_NOTE]
    failed = [run for run in runs if run.status == "failed"]
    if failed:
        body += ["", "Failed runs:"] + [
            f"- `{os.path.relpath(run.path, out)}`: {run.error}" for run in failed
        ]
    if pair:
        body += [""] + comparison(*pair, row_label, summaries[pair[0].number - 1]["score"])
    elif len(rows) > 2:
        body += [
            "",
            "Compare two rows with `--compare A B` (row numbers, or an override only that row has).",
        ]
    text = "\n".join(body)
    (out / "report.md").write_text(
        f"# metarun report\n\n{len(runs)} runs under "
        f"{', '.join(str(d) for d in dirs)}\n\n{text}\n\n![validation curves](curves.png)\n"
    )
    write_csv(out / "report.csv", rows, columns, summaries)
    plot_curves(out / "curves.png", rows, run_label)
    return text, 1 if failed or any(run.status == "damaged" for run in runs) else 0
