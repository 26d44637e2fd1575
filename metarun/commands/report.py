"""`metarun-report DIR [DIR...]`: one table of every run under the folders, and a comparison of two
rows; what it reads and how it compares is metarun.report's docstring."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from metarun.errors import MetarunError
from metarun.report import read_report, write_report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metarun-report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tabulate every run under DIRs (single runs, multirun and SLURM sweeps); runs differing only "
        "in seed share a row. Writes report.md, report.csv and curves.png into the first DIR.",
        epilog="Two rows (with exactly two, without --compare) are compared on the test episodes they share.\n"
        "With 2 or more finished seeds in each row the seed is the unit: each run's mean over the\n"
        "episodes, paired by seed when both rows ran the same seeds (paired t-test), else Welch's\n"
        "t-test. With one seed in a row the episodes are paired instead (each averaged over a row's\n"
        "seeds): that compares trained models on these episodes and leaves out seed-to-seed\n"
        "variance.\n"
        "Exit code: 2 for a bad argument, 1 if any run failed or is damaged (the report is still\n"
        "written), else 0.",
    )
    p.add_argument(
        "dirs", nargs="+", type=Path, metavar="DIR", help="a run folder or a folder of runs"
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="the rows to compare (B − A): a row number from the table, or an override only that "
        "row has, e.g. --compare optimizer.lr=0.01 optimizer.lr=0.001",
    )
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        runs, rows, pair = read_report(args.dirs, args.compare)
    except MetarunError as e:
        print(f"metarun-report: error: {e}", file=sys.stderr)
        return 2
    for run in runs:
        for problem in run.problems:
            print(f"metarun-report: warning: {run.path}: {problem}", file=sys.stderr)
    text, code = write_report(args.dirs, runs, rows, pair)
    out = args.dirs[0]
    print(text)
    print(f"wrote {out / 'report.md'}, report.csv, curves.png", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
