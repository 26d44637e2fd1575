"""One trained run re-tested with every head on its own fixed test episodes, as a markdown table.

For each head in conf/head/ (or --heads), `metarun-eval RUN eval.head=NAME name=head-NAME` writes
RUN/eval/head-NAME/ (a folder that is already there is read, not recomputed); the table gives each
head's accuracy ± 95% CI, its paired difference to the run's own test (B − A over the same episodes,
95% CI, metarun.stats.paired_difference), whether the test was transductive, and the seconds the
600 (eval.episodes) episodes took (`wall_time_s` of metarun-eval, the embedding included).

    python scripts/heads_table.py RUN [RUN ...] [--heads centroid logreg ...] [-- OVERRIDES ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metarun.commands.eval import main as metarun_eval
from metarun.heads.named import head_names
from metarun.stats import paired_difference


def read(folder: Path) -> tuple[dict, list[float]]:
    results = json.loads((folder / "results.json").read_text())
    return results, json.loads((folder / "test_episodes.json").read_text())["values"]


def retest(run: Path, head: str, overrides: list[str]) -> Path:
    folder = run / "eval" / f"head-{head}"
    if not (folder / "results.json").is_file():
        metarun_eval([str(run), f"eval.head={head}", *overrides, f"name=head-{head}"])
    return folder


def table(run: Path, heads: list[str], overrides: list[str]) -> str:
    own, own_values = read(run)
    lines = [
        f"{run.name}: its own test ({own['head']}) {100 * own['test_accuracy']:.1f}% ± "
        f"{100 * own['ci95']:.1f}, {own['episodes']} episodes, batch_norm={own['batch_norm']}",
        "",
        "| head | test accuracy | vs own test (paired) | transductive | seconds |",
        "|---|---|---|---|---|",
    ]
    for head in heads:
        results, values = read(retest(run, head, overrides))
        if values == own_values:
            difference = "0 (the same predictions)"
        else:
            d = paired_difference(own_values, values)
            difference = f"{100 * d.mean:+.2f} ± {100 * d.ci95:.2f}"
        lines.append(
            f"| {head} | {100 * results['test_accuracy']:.1f} ± {100 * results['ci95']:.1f} | "
            f"{difference} | {'yes' if results['transductive'] else 'no'} | "
            f"{results['wall_time_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    parser.add_argument("--heads", nargs="+", default=head_names())
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    print("\n\n".join(table(run, args.heads, overrides) for run in args.runs))


if __name__ == "__main__":
    main()
