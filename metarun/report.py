"""`metarun-report DIR [DIR...]`: one table of every run under the folders, and a paired comparison.

A run directory is a folder holding `.hydra/config.yaml` or `failed.json`: a single run, a Hydra
multirun's SWEEP/0, SWEEP/1, ..., a SLURM sweep's jobs (hidden folders such as `.submitit/` are
skipped). From each, read and never written:

  .hydra/overrides.yaml  the key=value overrides of its command line: they name its configuration
  .hydra/config.yaml     the composed config (train.steps, a running run's target)
  results.json           test_<score>, ci95, best_val_<score>, steps, wall_time_s     (finished)
  test_episodes.json     {"score", "identity": {...}, "values": [per-episode score]}   (finished)
  metrics.jsonl          {"step", "split": "val", "<score>": ...} lines; a cut-off line is skipped
  failed.json            {"error": one line, "overrides": [...]}                       (failed)

Runs whose overrides differ only in `seed` share a row. report.md, report.csv and curves.png go
into the first DIR; the table is printed. Exit code: 2 for a bad argument (nothing is written),
1 when any run failed (the report is still written), else 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import yaml

from metarun.errors import MetarunError
from metarun.stats import mean_and_std, paired_difference

STATUSES = ("finished", "running", "failed")
SPREAD_NOTE = ("± is the std over seeds (ddof=1) where a row averages several finished seeds, else the run's "
               "95% CI over test episodes; accuracy in %.")


@dataclass
class Run:
    """What one run directory says about itself; scores are fractions (accuracy) or raw (mse)."""
    path: Path
    overrides: dict[str, str]
    status: str  # one of STATUSES
    score: Optional[str] = None  # "accuracy", "mse": the name after test_ in results.json
    test: Optional[float] = None
    ci95: Optional[float] = None
    best_val: Optional[float] = None
    steps: Optional[int] = None  # results.json's, else the last step metrics.jsonl logged
    target_steps: Optional[int] = None  # train.steps
    wall_time_s: Optional[float] = None
    error: Optional[str] = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val score)
    episodes: Optional[dict[str, Any]] = None  # test_episodes.json


@dataclass
class Row:
    """One configuration: the runs whose overrides are equal once `seed` is left out."""
    number: int
    overrides: dict[str, str]
    runs: list[Run]


# -- reading runs ---------------------------------------------------------------------------------
def find_runs(dirs: list[Path]) -> list[Run]:
    """Every run at or below `dirs`, each once, in natural order (SWEEP/2 before SWEEP/10)."""
    runs, seen = [], set()
    for top in dirs:
        if not top.is_dir():
            raise MetarunError(f"{top} is not a directory; give a run or sweep folder, e.g. multirun/2024-05-01/12-00-00")
        found = list(run_dirs(top))
        if not found:
            raise MetarunError(f"{top} holds no runs (no .hydra/config.yaml or failed.json below it); "
                               "give the folder of a run or a sweep")
        runs += [read_run(path) for path in found if path.resolve() not in seen]
        seen.update(path.resolve() for path in found)
    return runs


def run_dirs(top: Path) -> Iterator[Path]:
    if (top / ".hydra" / "config.yaml").is_file() or (top / "failed.json").is_file():
        yield top
        return
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731
    for child in sorted((p for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural):
        yield from run_dirs(child)


def read_run(path: Path) -> Run:
    failed, results = read_json(path / "failed.json"), read_json(path / "results.json")
    listed = read_yaml(path / ".hydra" / "overrides.yaml")
    if listed is None and failed is not None:
        listed = failed.get("overrides")
    status = "failed" if failed is not None else "finished" if results is not None else "running"
    run = Run(path, parse_overrides(listed or []), status, episodes=read_json(path / "test_episodes.json"))
    results = results or {}
    metrics = read_metrics(path / "metrics.jsonl")
    run.score = (next((k[5:] for k in results if k.startswith("test_") and k != "test_loss"), None)
                 or (run.episodes or {}).get("score")
                 or next((k for m in metrics if m.get("split") == "val" for k in m if k not in ("step", "split", "loss")), None))
    run.curve = [(m["step"], m[run.score]) for m in metrics if m.get("split") == "val" and {"step", run.score} <= m.keys()]
    run.test, run.ci95 = results.get(f"test_{run.score}"), results.get("ci95")
    run.best_val = results.get(f"best_val_{run.score}")
    if run.best_val is None and run.curve:
        run.best_val = (min if run.score == "mse" else max)(value for _, value in run.curve)
    run.steps = results.get("steps", max((m["step"] for m in metrics if "step" in m), default=None))
    run.target_steps = ((read_yaml(path / ".hydra" / "config.yaml") or {}).get("train") or {}).get("steps")
    run.wall_time_s = results.get("wall_time_s")
    if failed is not None:
        run.error = (str(failed.get("error") or "").strip().splitlines() or ["(failed.json gives no error)"])[0]
    return run


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """`['+model.depth=4', 'seed=1']` -> {'model.depth': '4', 'seed': '1'}; `hydra.*` settings are left out."""
    pairs = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        if not key.lstrip("+").startswith("hydra."):
            pairs[key.lstrip("+")] = value
    return pairs


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's lines; one that does not parse (the last line of a killed run) is skipped."""
    lines = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict):
            lines.append(item)
    return lines


def read_json(path: Path) -> Optional[dict]:
    """None if the file is absent, {} if it does not hold a JSON object."""
    if not path.exists():
        return None
    try:
        item = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return item if isinstance(item, dict) else {}


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.exists() else None
    except yaml.YAMLError:
        return None


# -- rows -----------------------------------------------------------------------------------------
def group(runs: list[Run]) -> list[Row]:
    """Runs whose overrides are equal apart from `seed`, one row each, numbered from 1 in run order."""
    rows: dict[tuple, Row] = {}
    for run in runs:
        config = {key: value for key, value in run.overrides.items() if key != "seed"}
        rows.setdefault(tuple(sorted(config.items())), Row(len(rows) + 1, config, [])).runs.append(run)
    return list(rows.values())


def differing(overrides: list[dict[str, str]]) -> list[str]:
    """The keys whose value (or absence) is not the same in every dict, in order of first appearance."""
    keys = dict.fromkeys(key for pairs in overrides for key in pairs)
    return [key for key in keys if len({pairs.get(key) for pairs in overrides}) > 1]


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
        "test_mean": mean, "test_std": std if len(tested) > 1 else None,
        "test_ci95": tested[0].ci95 if len(tested) == 1 else None, "n_seeds": len(tested),
        "best_val_mean": float(np.mean(vals)) if vals else None,
        "steps_min": min(steps, default=None), "steps_max": max(steps, default=None),
        "wall_time_s": float(np.mean(times)) if times else None,
        **{status: sum(run.status == status for run in row.runs) for status in STATUSES},
        "error": next((run.error for run in row.runs if run.error), None),
    }


def status_text(row: Row, s: dict[str, Any]) -> str:
    if len(row.runs) > 1:
        text = ", ".join(f"{s[status]} {status}" for status in STATUSES if s[status])
    else:
        run = row.runs[0]
        text = run.status
        if run.status == "running" and run.steps is not None:
            text += f" (step {run.steps}" + (f"/{run.target_steps})" if run.target_steps else ")")
    return f"{text}: {s['error']}" if s["error"] else text


def fmt_score(score: Optional[str], value: Optional[float], spread: Optional[float] = None) -> str:
    if value is None:
        return "-"
    if score == "accuracy":
        return f"{100 * value:.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "")
    return f"{value:.4g}" + (f" ± {spread:.2g}" if spread is not None else "")


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(round(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def table(rows: list[Row], columns: list[str], summaries: list[dict[str, Any]]) -> str:
    """The markdown table: one line per row, the differing overrides first."""
    scores = " / ".join(dict.fromkeys(s["score"] for s in summaries if s["score"])) or "score"
    scores = scores.replace("accuracy", "accuracy (%)")
    seeds = any(len(row.runs) > 1 for row in rows)
    header = ["#", *columns, f"test {scores}", f"best val {scores}", *(["seeds"] * seeds), "steps", "wall time", "status"]
    lines = [header, ["---"] * len(header)]
    for row, s in zip(rows, summaries):
        steps = "-" if s["steps_min"] is None else str(s["steps_min"]) if s["steps_min"] == s["steps_max"] \
            else f"{s['steps_min']}–{s['steps_max']}"
        lines.append([str(row.number), *(row.overrides.get(key, "-") for key in columns),
                      fmt_score(s["score"], s["test_mean"], s["test_std"] if s["test_std"] is not None else s["test_ci95"]),
                      fmt_score(s["score"], s["best_val_mean"]), *([str(s["n_seeds"])] * seeds), steps,
                      fmt_duration(s["wall_time_s"]), status_text(row, s)])
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)


# -- the paired comparison ------------------------------------------------------------------------
def select(rows: list[Row], spec: str) -> Row:
    """A row by its number in the table (`2`) or by an override only it holds (`optimizer.lr=0.001`)."""
    if spec.isdigit():
        if 1 <= int(spec) <= len(rows):
            return rows[int(spec) - 1]
        raise MetarunError(f"--compare {spec}: the table has rows 1 to {len(rows)}; give one of those numbers")
    key, sep, value = spec.partition("=")
    matches = [row for row in rows if sep and row.overrides.get(key.lstrip("+")) == value]
    if not matches:
        raise MetarunError(f"--compare {spec}: no row has that override; give a row number (1 to {len(rows)}) "
                           "or a key=value shown in the table")
    if len(matches) > 1:
        raise MetarunError(f"--compare {spec}: rows {', '.join(str(r.number) for r in matches)} all have it; "
                           "give a row number instead")
    return matches[0]


def chosen_pair(rows: list[Row], compare: Optional[list[str]]) -> Optional[tuple[Row, Row]]:
    """The rows --compare names, else the only two rows there are, else None."""
    if compare is None:
        return (rows[0], rows[1]) if len(rows) == 2 else None
    a, b = (select(rows, spec) for spec in compare)
    if a is b:
        raise MetarunError(f"--compare {' '.join(compare)}: both select row {a.number}; choose two different rows")
    return a, b


def shared_episodes(a: Row, b: Row) -> tuple[np.ndarray, np.ndarray] | str:
    """Each row's per-episode scores, averaged over its finished seeds; or why the two cannot be paired."""
    finished = {row.number: [run for run in row.runs if run.status == "finished"] for row in (a, b)}
    for row in (a, b):
        if not finished[row.number]:
            return f"row {row.number} has no finished run"
        missing = next((run for run in finished[row.number] if run.episodes is None), None)
        if missing:
            return f"{missing.path} has no test_episodes.json"
    tested = [run.episodes for runs in finished.values() for run in runs]
    identities = [episodes.get("identity") for episodes in tested]
    if None in identities or any(identity != identities[0] for identity in identities):
        return "they were not tested on the same episodes (the identities in their test_episodes.json differ)"
    lengths = sorted({len(episodes.get("values") or []) for episodes in tested})
    if len(lengths) > 1:
        return f"they were not tested on the same episodes ({' and '.join(map(str, lengths))} episodes)"
    a_values, b_values = (np.mean([run.episodes["values"] for run in finished[row.number]], axis=0) for row in (a, b))
    return a_values, b_values


def comparison(a: Row, b: Row, label: dict[int, str], score: Optional[str]) -> list[str]:
    """The report's comparison section: B − A with its 95% CI and paired t-test, or a note why not."""
    lines = ["## Paired comparison", "", f"A = row {a.number} ({label[a.number]}), B = row {b.number} ({label[b.number]})", ""]
    paired = shared_episodes(a, b)
    if isinstance(paired, str) or len(paired[0]) < 2:
        why = paired if isinstance(paired, str) else "fewer than 2 test episodes"
        return lines + [f"No paired test: {why}. Compare their ± intervals in the table instead."]
    mean, ci95, p, n = paired_difference(*paired)
    seeds = [sum(run.status == "finished" for run in row.runs) for row in (a, b)]
    return lines + [
        f"Paired over the {n} test episodes both rows share; each episode's {score or 'score'} is first averaged "
        f"over a row's finished seeds ({seeds[0]} in A, {seeds[1]} in B).",
        "",
        (f"B − A = {100 * mean:+.2f} ± {100 * ci95:.2f} points of accuracy" if score == "accuracy" else
         f"B − A = {mean:+.4g} ± {ci95:.2g} {score or 'score'}") + f" (95% CI, t with {n - 1} df); "
        f"paired t-test p = {p:.2g}" + ("; lower mse is better." if score == "mse" else "."),
    ]


# -- outputs --------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[Row], columns: list[str], summaries: list[dict[str, Any]]) -> None:
    """report.csv: the table's rows, one value per column, scores as fractions (not %)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", *columns, *summaries[0]])
        for row, s in zip(rows, summaries):
            writer.writerow([row.number, *(row.overrides.get(key, "") for key in columns),
                             *("" if value is None else value for value in s.values())])


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
                scale = 100 if run.score == "accuracy" else 1
                ax.plot([step for step, _ in run.curve], [scale * value for _, value in run.curve], marker=".",
                        color=f"C{(row.number - 1) % 10}", label=label[run.path])
    names = dict.fromkeys(run.score for row in rows for run in row.runs if run.curve)
    ax.set_xlabel("step")
    ax.set_ylabel("validation " + " / ".join(names).replace("accuracy", "accuracy (%)"))
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no validation scores logged yet", ha="center", transform=ax.transAxes)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metarun-report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tabulate every run under DIRs (single runs, multirun and SLURM sweeps); runs differing only "
                    "in seed share a row. Writes report.md, report.csv and curves.png into the first DIR.",
        epilog="With exactly two rows, they are compared on their shared test episodes without --compare;\n"
               "each episode's score is first averaged over a row's finished seeds.\n"
               "Exit code: 2 for a bad argument, 1 if any run failed (the report is still written), else 0.")
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="a run folder or a folder of runs")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="the rows to compare episode by episode (B − A): a row number from the table, or an "
                        "override only that row has, e.g. --compare optimizer.lr=0.01 optimizer.lr=0.001")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        runs = find_runs(args.dirs)
        rows = group(runs)
        pair = chosen_pair(rows, args.compare)
    except MetarunError as e:
        print(f"metarun-report: error: {e}", file=sys.stderr)
        return 2
    out = args.dirs[0]
    columns = differing([row.overrides for row in rows])
    summaries = [summarize(row) for row in rows]
    run_keys = differing([run.overrides for run in runs])
    run_label = {run.path: " ".join(f"{k}={run.overrides[k]}" for k in run_keys if k in run.overrides) or run.path.name
                 for run in runs}
    row_label = {row.number: " ".join(f"{k}={row.overrides[k]}" for k in columns if k in row.overrides) or "defaults"
                 for row in rows}
    body = [table(rows, columns, summaries), "", SPREAD_NOTE]
    failed = [run for run in runs if run.status == "failed"]
    if failed:
        body += ["", "Failed runs:"] + [f"- `{os.path.relpath(run.path, out)}`: {run.error}" for run in failed]
    if pair:
        body += [""] + comparison(*pair, row_label, summaries[pair[0].number - 1]["score"])
    elif len(rows) > 2:
        body += ["", "Compare two rows on their shared test episodes with `--compare A B` (row numbers)."]
    text = "\n".join(body)
    (out / "report.md").write_text(f"# metarun report\n\n{len(runs)} runs under "
                                   f"{', '.join(str(d) for d in args.dirs)}\n\n{text}\n\n![validation curves](curves.png)\n")
    write_csv(out / "report.csv", rows, columns, summaries)
    plot_curves(out / "curves.png", rows, run_label)
    print(text)
    print(f"wrote {out / 'report.md'}, report.csv, curves.png", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
