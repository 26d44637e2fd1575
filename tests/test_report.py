"""`metarun-report DIR`: the sweep table, report.csv/curves.png, and the paired comparison on shared episodes.

Run directories are written by hand in the formats the trainer and CLI write, with known numbers.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from metarun.report import main
from metarun.stats import paired_difference

IDENTITY = {"dataset": "omniglot", "split": "test", "eval.seed": 0, "n_way": 5, "k_shot": 1}


def write_run(path: Path, overrides: list[str], *, test: float | None = None, ci95: float = 0.01,
              best_val: float = 0.9, episodes: list[float] | None = None, identity: dict | None = None,
              val: list[tuple[int, float]] = (), metrics_tail: str = "", error: str | None = None,
              score: str = "accuracy", train_steps: int = 3000, wall_time_s: float = 123.4,
              hydra_record: bool = True) -> Path:
    """A run directory as `metarun` leaves it: finished when `test` is given, failed when `error` is."""
    path.mkdir(parents=True)
    if hydra_record:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "config.yaml").write_text(f"seed: 0\ntrain:\n  steps: {train_steps}\n")
        (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    lines = [json.dumps({"step": step, "split": "val", "loss": 0.3, score: value}) for step, value in val]
    (path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines) + metrics_tail)
    if test is not None:
        (path / "results.json").write_text(json.dumps({
            f"test_{score}": test, "ci95": ci95, "episodes": len(episodes or []), "test_loss": 0.2,
            f"best_val_{score}": best_val, "steps": train_steps, "batch_norm": "task",
            "wall_time_s": wall_time_s, "config": {}}))
    if episodes is not None:
        (path / "test_episodes.json").write_text(json.dumps(
            {"score": score, "identity": identity or IDENTITY, "values": episodes}))
    if error is not None:
        (path / "failed.json").write_text(json.dumps({"error": error, "overrides": overrides}))
    return path


def report(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> list[list[str]]:
    """The printed markdown table's cells, header first (the --- line dropped)."""
    lines = [line for line in out.splitlines() if line.startswith("|") and not line.startswith("| ---")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# -- the table ------------------------------------------------------------------------------------
def test_seeds_share_a_row_with_mean_and_sample_std(capsys, tmp_path):
    accuracies = {"0.1": [0.90, 0.93, 0.96], "0.01": [0.80, 0.82, 0.87]}
    job = 0
    for lr, tests in accuracies.items():
        for seed, test in enumerate(tests):
            write_run(tmp_path / str(job), [f"optimizer.lr={lr}", f"seed={seed}"], test=test, best_val=test - 0.01)
            job += 1
    code, out, err = report(capsys, tmp_path)
    assert code == 0, err
    header, *rows = table_rows(out)
    assert header == ["#", "optimizer.lr", "test accuracy (%)", "best val accuracy (%)", "seeds", "steps",
                      "wall time", "status"]  # seed is grouped over, not a column
    # 0.1: mean 0.93, std sqrt((0.03² + 0 + 0.03²) / 2) = 0.03; 0.01: mean 0.83, std sqrt(26e-4 / 2) = 0.0361
    assert rows == [["1", "0.1", "93.0 ± 3.0", "92.0", "3", "3000", "2m03s", "3 finished"],
                    ["2", "0.01", "83.0 ± 3.6", "82.0", "3", "3000", "2m03s", "3 finished"]]
    csv_rows = read_csv(tmp_path / "report.csv")
    assert float(csv_rows[1]["test_mean"]) == pytest.approx(0.83)
    assert float(csv_rows[1]["test_std"]) == pytest.approx(math.sqrt(26e-4 / 2))
    assert float(csv_rows[1]["test_std"]) == pytest.approx(statistics.stdev([0.80, 0.82, 0.87]))
    assert csv_rows[1]["n_seeds"] == "3" and csv_rows[1]["test_ci95"] == ""


def test_columns_are_the_overrides_that_differ_and_an_absent_key_shows_a_dash(capsys, tmp_path):
    write_run(tmp_path / "0", ["algorithm=protonet", "optimizer.lr=0.001", "train.steps=100"], test=0.95, ci95=0.004)
    write_run(tmp_path / "1", ["algorithm=maml", "optimizer.lr=0.001", "train.steps=100", "+algorithm.inner_lr=0.4"],
              test=0.9312, ci95=0.0051)
    write_run(tmp_path / "2", ["algorithm=maml", "optimizer.lr=0.001", "train.steps=100", "algorithm.inner_lr=0.1"],
              test=0.912, ci95=0.006)
    code, out, err = report(capsys, tmp_path)
    header, *rows = table_rows(out)
    assert header[:3] == ["#", "algorithm", "algorithm.inner_lr"]
    assert "optimizer.lr" not in header and "train.steps" not in header and "seeds" not in header
    # Single runs show test ± their 95% CI over episodes.
    assert [row[:4] for row in rows] == [["1", "protonet", "-", "95.0 ± 0.4"], ["2", "maml", "0.4", "93.1 ± 0.5"],
                                         ["3", "maml", "0.1", "91.2 ± 0.6"]]
    csv_rows = read_csv(tmp_path / "report.csv")
    assert [(r["algorithm"], r["algorithm.inner_lr"], float(r["test_ci95"])) for r in csv_rows] == [
        ("protonet", "", 0.004), ("maml", "0.4", 0.0051), ("maml", "0.1", 0.006)]


def test_mse_is_shown_raw_with_its_own_header(capsys, tmp_path):
    write_run(tmp_path / "0", ["algorithm.inner_lr=0.01"], test=0.01234, ci95=0.00056, best_val=0.02, score="mse")
    write_run(tmp_path / "1", ["algorithm.inner_lr=0.1"], test=0.5, ci95=0.03, best_val=0.6, score="mse")
    code, out, err = report(capsys, tmp_path)
    header, *rows = table_rows(out)
    assert header[2:4] == ["test mse", "best val mse"]
    assert [row[2:4] for row in rows] == [["0.01234 ± 0.00056", "0.02"], ["0.5 ± 0.03", "0.6"]]


def test_a_failed_run_is_listed_with_its_error_and_the_exit_code_is_1(capsys, tmp_path):
    write_run(tmp_path / "0", ["optimizer.lr=0.1", "seed=0"], test=0.9, best_val=0.88)
    write_run(tmp_path / "1", ["optimizer.lr=0.1", "seed=1"], error="CUDA out of memory; lower episode.meta_batch_size",
              val=[(100, 0.5)])
    # Failed before Hydra's record was written: its overrides come from failed.json.
    write_run(tmp_path / "2", ["optimizer.lr=10", "seed=0"], error="loss is nan at step 12; lower optimizer.lr",
              hydra_record=False)
    code, out, err = report(capsys, tmp_path)
    assert code == 1
    _, seeds, failed = table_rows(out)
    # The failed seed's partial validation does not enter the row's best val; its steps do.
    assert seeds[1:] == ["0.1", "90.0 ± 1.0", "88.0", "1", "100–3000", "2m03s",
                         "1 finished, 1 failed: CUDA out of memory; lower episode.meta_batch_size"]
    assert failed[1] == "10" and failed[-1] == "failed: loss is nan at step 12; lower optimizer.lr"
    assert "- `2`: loss is nan at step 12; lower optimizer.lr" in out
    assert (tmp_path / "report.md").exists()  # written all the same
    assert [row["failed"] for row in read_csv(tmp_path / "report.csv")] == ["1", "1"]


def test_a_run_without_results_is_running_and_a_cut_off_metrics_line_is_skipped(capsys, tmp_path):
    write_run(tmp_path / "0", ["optimizer.lr=0.1"], val=[(500, 0.62), (1000, 0.71), (1500, 0.69)],
              metrics_tail='{"step": 2000, "split": "va')  # killed mid-write
    write_run(tmp_path / "1", ["optimizer.lr=0.01"], test=0.9, val=[(3000, 0.88)])
    code, out, err = report(capsys, tmp_path)
    assert code == 0, err
    _, running, _ = table_rows(out)
    assert running[1:] == ["0.1", "-", "71.0", "1500", "-", "running (step 1500/3000)"]
    row = read_csv(tmp_path / "report.csv")[0]
    assert (row["running"], row["steps_max"], float(row["best_val_mean"])) == ("1", "1500", 0.71)


def test_report_csv_and_curves_png_are_written_in_the_first_dir_only(capsys, tmp_path):
    first, second = tmp_path / "sweep_a", tmp_path / "sweep_b"
    write_run(first / "0", ["seed=0"], test=0.9, val=[(100, 0.5), (200, 0.7)])
    write_run(second / "0", ["seed=1"], test=0.8, val=[(100, 0.4), (200, 0.6)])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, out, err = report(capsys, first, second)
    assert code == 0, err
    assert sorted(p.name for p in first.iterdir() if p.is_file()) == ["curves.png", "report.csv", "report.md"]
    assert not list(second.glob("report.*")) and not list(second.glob("curves.png"))
    assert {p: p.read_bytes() for p in before} == before  # run directories untouched
    assert (first / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [row] = read_csv(first / "report.csv")  # seeds 0 and 1: one configuration
    assert (float(row["test_mean"]), float(row["test_std"]), row["n_seeds"]) == (
        pytest.approx(0.85), pytest.approx(math.sqrt(2 * 0.05 ** 2)), "2")
    assert "| 1 | 85.0 ± 7.1 |" in (first / "report.md").read_text()


def test_a_slurm_sweep_is_read_in_job_order_and_submitit_is_ignored(capsys, tmp_path):
    for job in range(11):
        write_run(tmp_path / str(job), [f"optimizer.lr={job}"], test=0.5)
    (tmp_path / ".submitit" / "123_0").mkdir(parents=True)
    (tmp_path / ".submitit" / "123_0" / "failed.json").write_text("{}")  # not a run
    code, out, err = report(capsys, tmp_path)
    assert code == 0, err
    assert [row[1] for row in table_rows(out)[1:]] == [str(job) for job in range(11)]  # 10 after 9


def test_a_missing_or_empty_dir_is_one_line_naming_the_fix_and_exit_2(capsys, tmp_path):
    code, out, err = report(capsys, tmp_path / "nowhere")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("metarun-report: error: ") and "give a run or sweep folder" in err
    code, out, err = report(capsys, tmp_path)
    assert code == 2 and "holds no runs" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


# -- the paired comparison ------------------------------------------------------------------------
A_SEEDS = [[0.6, 0.8, 1.0, 0.4, 0.8, 0.6], [0.8, 0.8, 0.8, 0.6, 0.6, 0.4]]
B_SEEDS = [[0.8, 1.0, 1.0, 0.6, 0.8, 0.8], [1.0, 0.8, 1.0, 0.6, 1.0, 0.6]]


def hand_paired(a_seeds, b_seeds) -> tuple[float, float, float]:
    """Mean of d over episodes (each averaged over seeds first), t-quantile CI, two-sided p from the t cdf."""
    a = [sum(column) / len(column) for column in zip(*a_seeds)]
    b = [sum(column) / len(column) for column in zip(*b_seeds)]
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    t = mean / (sd / math.sqrt(n))
    return mean, stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n), 2 * stats.t.sf(abs(t), n - 1)


def write_pair(root: Path, b_identity: dict | None = None, b_length: int | None = None) -> None:
    for seed, values in enumerate(A_SEEDS):
        write_run(root / f"a{seed}", ["algorithm=maml", f"seed={seed}"], test=float(np.mean(values)), episodes=values)
    for seed, values in enumerate(B_SEEDS):
        values = values[:b_length] if b_length else values
        write_run(root / f"b{seed}", ["algorithm=protonet", f"seed={seed}"], test=float(np.mean(values)),
                  episodes=values, identity=b_identity)


def test_paired_difference_matches_a_hand_computation():
    a, b = [0.5, 0.7, 0.9, 0.6], [0.7, 0.8, 0.9, 0.9]
    # d = [0.2, 0.1, 0.0, 0.3]: mean 0.15, sd sqrt(0.05 / 3), t = 0.15 / (sd / 2)
    sd = math.sqrt(0.05 / 3)
    mean, ci95, p, n = paired_difference(a, b)
    assert n == 4 and mean == pytest.approx(0.15)
    assert ci95 == pytest.approx(3.182446305284263 * sd / 2)  # t_{0.975, 3}
    assert p == pytest.approx(2 * stats.t.sf(0.15 / (sd / 2), 3))
    assert p == pytest.approx(0.1027, abs=1e-4)  # t = 2.324 on 3 df


def test_two_configurations_are_compared_on_episodes_averaged_over_seeds(capsys, tmp_path):
    write_pair(tmp_path)
    code, out, err = report(capsys, tmp_path)
    assert code == 0, err
    mean, ci95, p = hand_paired(A_SEEDS, B_SEEDS)
    assert mean == pytest.approx(0.8 - 0.65)  # B averages 0.8 over its episodes, A 0.65
    assert "A = row 1 (algorithm=maml), B = row 2 (algorithm=protonet)" in out
    assert "averaged over a row's finished seeds (2 in A, 2 in B)" in out
    # a = [.7, .8, .9, .5, .7, .5], b = [.9, .9, 1., .6, .9, .7]: d = .15 ± .05 each, sd = sqrt(.015 / 5)
    assert "B − A = +15.00 ± 5.75 points of accuracy (95% CI, t with 5 df); paired t-test p = 0.0011." in out
    assert f"B − A = {100 * mean:+.2f} ± {100 * ci95:.2f} points of accuracy (95% CI, t with 5 df); " \
           f"paired t-test p = {p:.2g}." in out
    assert "## Paired comparison" in (tmp_path / "report.md").read_text()


def test_compare_selects_rows_by_override_or_number(capsys, tmp_path):
    write_pair(tmp_path)
    write_run(tmp_path / "c0", ["algorithm=matchingnet"], test=0.7, episodes=[0.7] * 6)
    code, out, err = report(capsys, tmp_path)
    assert "Paired comparison" not in out and "--compare A B" in out  # three rows: nothing chosen
    mean, ci95, p = hand_paired(B_SEEDS, A_SEEDS)
    code, out, err = report(capsys, tmp_path, "--compare", "algorithm=protonet", "1")
    assert code == 0, err
    assert "A = row 2 (algorithm=protonet), B = row 1 (algorithm=maml)" in out
    assert f"B − A = {100 * mean:+.2f} ± {100 * ci95:.2f} points" in out
    code, out, err = report(capsys, tmp_path, "--compare", "algorithm=reptile", "1")
    assert code == 2 and "no row has that override" in err and err.count("\n") == 1


def test_different_episode_identities_give_a_note_and_no_test(capsys, tmp_path):
    write_pair(tmp_path, b_identity={**IDENTITY, "eval.seed": 1})
    code, out, err = report(capsys, tmp_path)
    assert code == 0, err
    assert "No paired test: they were not tested on the same episodes (the identities" in out
    assert "B − A" not in out and "t-test" not in out


def test_different_episode_counts_give_a_note_and_no_test(capsys, tmp_path):
    write_pair(tmp_path, b_length=5)
    code, out, err = report(capsys, tmp_path)
    assert "No paired test: they were not tested on the same episodes (5 and 6 episodes)" in out
    assert "B − A" not in out
