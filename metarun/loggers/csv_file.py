"""logger=csv: metrics.csv in the run directory, the same rows as metrics.jsonl (one per logged
step and split), with a column for every name any row has (empty where a row has none)."""

from __future__ import annotations

import csv
import io
import json

from metarun import run_dir as files
from metarun.atomic import write_atomically, write_errors
from metarun.loggers.base import Logger, RunInfo


class CSVLogger(Logger):
    name = "csv"

    def start(self, info: RunInfo) -> None:
        # A resumed run's metrics.jsonl has already dropped the lines after its checkpoint.
        self.path = files.metrics_csv_file(info.run_dir)
        jsonl = files.metrics_file(info.run_dir)
        lines = jsonl.read_text().splitlines() if jsonl.exists() else []
        self.rows = [json.loads(line) for line in lines if line.strip()]
        self.columns: list[str] = []
        for row in self.rows:
            self.add_columns(row)
        self.rewrite()

    def add_columns(self, row: dict) -> bool:
        new = [key for key in row if key not in self.columns]
        self.columns += new
        return bool(new)

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        row = {"step": step, "split": split, **values}
        self.rows.append(row)
        if self.add_columns(row):  # a new column: the header changes, so the whole file does
            self.rewrite()
            return
        with write_errors(self.path), self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, lineterminator="\n").writerow(row)

    def rewrite(self) -> None:
        text = io.StringIO(newline="")
        if self.columns:  # no row yet: an empty file
            writer = csv.DictWriter(text, self.columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
        write_atomically(self.path, lambda f: f.write(text.getvalue().encode()))
