"""`metarun-report DIR`: the sweep table, report.csv/curves.png, and the paired comparison on shared episodes.

Run directories are written by hand in the formats the trainer and CLI write, with known numbers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from metarun.commands.report import main
from metarun.experiment import Experiment
from metarun.report import Row, Run, comparison
from metarun.run_dir import protocol_identity
from metarun.score import ACCURACY
from metarun.stats import paired_difference, welch_difference
from tests.conftest import SMALL_RUN, compose_config
from tests.fixtures.folder import write_folder

IDENTITY = {"dataset": "omniglot", "split": "test", "eval.seed": 0, "n_way": 5, "k_shot": 1}


def write_run(
    path: Path,
    overrides: list[str],
    *,
    test: float | None = None,
    ci95: float = 0.01,
    best_val: float = 0.9,
    episodes: list[float] | None = None,
    identity: dict | None = None,
    val: list[tuple[int, float]] = (),
    metrics_tail: str = "",
    error: str | None = None,
    score: str = "accuracy",
    train_steps: int = 3000,
    wall_time_s: float = 123.4,
    hydra_record: bool = True,
) -> Path:
    """A run directory as `metarun` leaves it: finished when `test` is given, failed when `error` is."""
    path.mkdir(parents=True)
    if hydra_record:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "config.yaml").write_text(f"seed: 0\ntrain:\n  steps: {train_steps}\n")
        (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    lines = [
        json.dumps({"step": step, "split": "val", "loss": 0.3, score: value}) for step, value in val
    ]
    (path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines) + metrics_tail)
    if test is not None:
        (path / "results.json").write_text(
            json.dumps(
                {
                    f"test_{score}": test,
                    "ci95": ci95,
                    "episodes": len(episodes or []),
                    "test_loss": 0.2,
                    f"best_val_{score}": best_val,
                    "steps": train_steps,
                    "batch_norm": "task",
                    "wall_time_s": wall_time_s,
                    "config": {},
                }
            )
        )
    if episodes is not None:
        (path / "test_episodes.json").write_text(
            json.dumps({"score": score, "identity": identity or IDENTITY, "values": episodes})
        )
    if error is not None:
        (path / "failed.json").write_text(json.dumps({"error": error, "overrides": overrides}))
    return path


def report(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> list[list[str]]:
    """The printed markdown table's cells, header first (the --- line dropped)."""
    lines = [
        line for line in out.splitlines() if line.startswith("|") and not line.startswith("| ---")
    ]
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
            write_run(
                tmp_path / str(job),
                [f"optimizer.lr={lr}", f"seed={seed}"],
                test=test,
                best_val=test - 0.01,
            )
            job += 1
    code, out, err = report(capsys, tmp_path)
    assert code == 0, err
    header, *rows = table_rows(out)
    assert header == [
        "#",
        "optimizer.lr",
        "test accuracy (%)",
        "best val accuracy (%)",
        "seeds",
        "steps",
        "wall time",
        "status",
    ]  # seed is grouped over, not a column
    # 0.1: mean 0.93, std sqrt((0.03² + 0 + 0.03²) / 2) = 0.03; 0.01: mean 0.83, std sqrt(26e-4 / 2) = 0.0361
    assert rows == [
        ["1", "0.1", "93.0 ± 3.0", "92.0", "3", "3000", "2m03s", "3 finished"],
        ["2", "0.01", "83.0 ± 3.6", "82.0", "3", "3000", "2m03s", "3 finished"],
    ]
    csv_rows = read_csv(tmp_path / "report.csv")
    assert float(csv_rows[1]["test_mean"]) == pytest.approx(0.83)
    assert float(csv_rows[1]["test_std"]) == pytest.approx(math.sqrt(26e-4 / 2))
    assert float(csv_rows[1]["test_std"]) == pytest.approx(statistics.stdev([0.80, 0.82, 0.87]))
    assert csv_rows[1]["n_seeds"] == "3" and csv_rows[1]["test_ci95"] == ""


def test_columns_are_the_overrides_that_differ_and_an_absent_key_shows_a_dash(capsys, tmp_path):
    write_run(
        tmp_path / "0",
        ["algorithm=protonet", "optimizer.lr=0.001", "train.steps=100"],
        test=0.95,
        ci95=0.004,
    )
    write_run(
        tmp_path / "1",
        ["algorithm=maml", "optimizer.lr=0.001", "train.steps=100", "+algorithm.inner_lr=0.4"],
        test=0.9312,
        ci95=0.0051,
    )
    write_run(
        tmp_path / "2",
        ["algorithm=maml", "optimizer.lr=0.001", "train.steps=100", "algorithm.inner_lr=0.1"],
        test=0.912,
        ci95=0.006,
    )
    code, out, err = report(capsys, tmp_path)
    header, *rows = table_rows(out)
    assert header[:3] == ["#", "algorithm", "algorithm.inner_lr"]
    assert "optimizer.lr" not in header and "train.steps" not in header and "seeds" not in header
    # Single runs show test ± their 95% CI over episodes.
    assert [row[:4] for row in rows] == [
        ["1", "protonet", "-", "95.0 ± 0.4"],
        ["2", "maml", "0.4", "93.1 ± 0.5"],
        ["3", "maml", "0.1", "91.2 ± 0.6"],
    ]
    csv_rows = read_csv(tmp_path / "report.csv")
    assert [(r["algorithm"], r["algorithm.inner_lr"], float(r["test_ci95"])) for r in csv_rows] == [
        ("protonet", "", 0.004),
        ("maml", "0.4", 0.0051),
        ("maml", "0.1", 0.006),
    ]


def test_mse_is_shown_raw_with_its_own_header(capsys, tmp_path):
    write_run(
        tmp_path / "0",
        ["algorithm.inner_lr=0.01"],
        test=0.01234,
        ci95=0.00056,
        best_val=0.02,
        score="mse",
    )
    write_run(
        tmp_path / "1", ["algorithm.inner_lr=0.1"], test=0.5, ci95=0.03, best_val=0.6, score="mse"
    )
    code, out, err = report(capsys, tmp_path)
    header, *rows = table_rows(out)
    assert header[2:4] == ["test mse", "best val mse"]
    assert [row[2:4] for row in rows] == [["0.01234 ± 0.00056", "0.02"], ["0.5 ± 0.03", "0.6"]]


def test_a_failed_run_is_listed_with_its_error_and_the_exit_code_is_1(capsys, tmp_path):
    write_run(tmp_path / "0", ["optimizer.lr=0.1", "seed=0"], test=0.9, best_val=0.88)
    write_run(
        tmp_path / "1",
        ["optimizer.lr=0.1", "seed=1"],
        error="CUDA out of memory; lower episode.meta_batch_size",
        val=[(100, 0.5)],
    )
    # Failed before Hydra's record was written: its overrides come from failed.json.
    write_run(
        tmp_path / "2",
        ["optimizer.lr=10", "seed=0"],
        error="loss is nan at step 12; lower optimizer.lr",
        hydra_record=False,
    )
    code, out, err = report(capsys, tmp_path)
    assert code == 1
    _, seeds, failed = table_rows(out)
    # The failed seed's partial validation does not enter the row's best val; its steps do.
    assert seeds[1:] == [
        "0.1",
        "90.0 ± 1.0",
        "88.0",
        "1",
        "100–3000",
        "2m03s",
        "1 finished, 1 failed: CUDA out of memory; lower episode.meta_batch_size",
    ]
    assert failed[1] == "10" and failed[-1] == "failed: loss is nan at step 12; lower optimizer.lr"
    assert "- `2`: loss is nan at step 12; lower optimizer.lr" in out
    assert (tmp_path / "report.md").exists()  # written all the same
    assert [row["failed"] for row in read_csv(tmp_path / "report.csv")] == ["1", "1"]


def test_a_run_without_results_is_running_and_a_cut_off_metrics_line_is_skipped(capsys, tmp_path):
    write_run(
        tmp_path / "0",
        ["optimizer.lr=0.1"],
        val=[(500, 0.62), (1000, 0.71), (1500, 0.69)],
        metrics_tail='{"step": 2000, "split": "va',
    )  # killed mid-write
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
    assert sorted(p.name for p in first.iterdir() if p.is_file()) == [
        "curves.png",
        "report.csv",
        "report.md",
    ]
    assert not list(second.glob("report.*")) and not list(second.glob("curves.png"))
    assert {p: p.read_bytes() for p in before} == before  # run directories untouched
    assert (first / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [row] = read_csv(first / "report.csv")  # seeds 0 and 1: one configuration
    assert (float(row["test_mean"]), float(row["test_std"]), row["n_seeds"]) == (
        pytest.approx(0.85),
        pytest.approx(math.sqrt(2 * 0.05**2)),
        "2",
    )
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
    assert (
        err.count("\n") == 1
        and err.startswith("metarun-report: error: ")
        and "give a run or sweep folder" in err
    )
    code, out, err = report(capsys, tmp_path)
    assert code == 2 and "holds no runs" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


# -- comparing two rows ---------------------------------------------------------------------------
A_SEEDS = [[0.6, 0.8, 1.0, 0.4, 0.8, 0.6], [0.8, 0.8, 0.8, 0.6, 0.6, 0.4]]
B_SEEDS = [[0.8, 1.0, 1.0, 0.6, 0.8, 0.8], [1.0, 0.8, 1.0, 0.6, 1.0, 0.8]]


def hand_paired(a, b) -> tuple[float, float, float]:
    """Mean of d = b - a, its t-quantile CI half-width, and the two-sided p from the t cdf."""
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    t = mean / (sd / math.sqrt(n))
    return mean, stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n), 2 * stats.t.sf(abs(t), n - 1)


def write_pair(
    root: Path,
    b_identity: dict | None = None,
    b_length: int | None = None,
    a_seeds: tuple[int, ...] = (0, 1),
    b_seeds: tuple[int, ...] = (0, 1),
) -> None:
    for seed, values in zip(a_seeds, A_SEEDS):
        write_run(
            root / f"a{seed}",
            ["algorithm=maml", f"seed={seed}"],
            test=float(np.mean(values)),
            episodes=values,
        )
    for seed, values in zip(b_seeds, B_SEEDS):
        values = values[:b_length] if b_length else values
        write_run(
            root / f"b{seed}",
            ["algorithm=protonet", f"seed={seed}"],
            test=float(np.mean(values)),
            episodes=values,
            identity=b_identity,
        )


def test_paired_difference_matches_a_hand_computation():
    a, b = [0.5, 0.7, 0.9, 0.6], [0.7, 0.8, 0.9, 0.9]
    # d = [0.2, 0.1, 0.0, 0.3]: mean 0.15, sd sqrt(0.05 / 3), t = 0.15 / (sd / 2)
    sd = math.sqrt(0.05 / 3)
    mean, ci95, p, df = paired_difference(a, b)
    assert df == 3 and mean == pytest.approx(0.15)
    assert ci95 == pytest.approx(3.182446305284263 * sd / 2)  # t_{0.975, 3}
    assert p == pytest.approx(2 * stats.t.sf(0.15 / (sd / 2), 3))
    assert p == pytest.approx(0.1027, abs=1e-4)  # t = 2.324 on 3 df


def test_welch_difference_matches_a_hand_computation_and_scipys_interval():
    a, b = [0.90, 0.93, 0.96], [0.80, 0.82, 0.87, 0.85]
    # squared standard errors: s_a² / 3 = 0.0009 / 3 = 3e-4; s_b² / 4 = (0.0029 / 3) / 4
    va, vb = 0.0009 / 3, 0.0029 / 12
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    mean, ci95, p, got_df = welch_difference(a, b)
    assert mean == pytest.approx(0.835 - 0.93) and got_df == pytest.approx(df)
    assert df == pytest.approx(4.55, abs=0.01)  # (5.417e-4)² / ((3e-4)² / 2 + (2.417e-4)² / 3)
    assert ci95 == pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(va + vb))
    assert p == pytest.approx(2 * stats.t.sf(0.095 / math.sqrt(va + vb), df))
    low, high = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert (mean - ci95, mean + ci95) == (pytest.approx(low), pytest.approx(high))


def test_rows_that_ran_the_same_seeds_are_paired_by_seed(capsys, tmp_path):
    write_pair(tmp_path)
    code, out, err = report(capsys, tmp_path)
    assert code == 0, err
    # Each run's mean over its 6 episodes: A = [0.7, 0.6667], B = [0.8333, 0.8667]; d = [0.1333, 0.2]
    mean, ci95, p = hand_paired([np.mean(v) for v in A_SEEDS], [np.mean(v) for v in B_SEEDS])
    assert mean == pytest.approx(1 / 6) and p == pytest.approx(0.1257, abs=1e-4)  # t = 5 on 1 df
    assert "A = row 1 (algorithm=maml), B = row 2 (algorithm=protonet)" in out
    assert (
        "Seed as the unit: each run's mean accuracy over the 6 test episodes both rows share, paired by seed "
        "(seeds 0, 1 in both rows): a paired t-test over 2 seeds."
    ) in out
    assert (
        f"B − A = {100 * mean:+.2f} ± {100 * ci95:.2f} points of accuracy (95% CI, t with 1 df); p = {p:.2g}."
        in out
    )
    assert "B − A = +16.67 ± 42.35 points of accuracy (95% CI, t with 1 df); p = 0.13." in out
    assert "With one seed" not in out  # the caveat is for one seed
    assert "## Comparison" in (tmp_path / "report.md").read_text()


def test_rows_that_ran_different_seeds_get_welchs_test_over_runs(capsys, tmp_path):
    write_pair(tmp_path, a_seeds=(0, 1), b_seeds=(2, 3))
    code, out, err = report(capsys, tmp_path)
    assert code == 0, err
    mean, ci95, p, df = welch_difference(
        [np.mean(v) for v in A_SEEDS], [np.mean(v) for v in B_SEEDS]
    )
    # Both rows' runs lie 1/30 apart: equal variances and sizes, so df = n_a + n_b - 2 = 2
    assert df == pytest.approx(2) and mean == pytest.approx(1 / 6)
    assert (
        "the rows ran different seeds (0, 1 in A, 2, 3 in B): Welch's t-test over 2 and 2 runs."
        in out
    )
    assert (
        f"B − A = {100 * mean:+.2f} ± {100 * ci95:.2f} points of accuracy (95% CI, Welch's t with 2.0 df); "
        f"p = {p:.2g}." in out
    )


def test_one_seed_pairs_the_episodes_and_says_it_leaves_out_seed_variance(capsys, tmp_path):
    write_pair(tmp_path, a_seeds=(0,))
    code, out, err = report(capsys, tmp_path)
    assert code == 0, err
    b = [sum(column) / 2 for column in zip(*B_SEEDS)]  # each episode averaged over B's 2 seeds
    mean, ci95, p = hand_paired(A_SEEDS[0], b)
    assert (
        "Paired over the 6 test episodes both rows share, each episode's accuracy averaged over a row's "
        "finished seeds (1 in A, 2 in B): a paired t-test over episodes."
    ) in out
    assert (
        f"B − A = {100 * mean:+.2f} ± {100 * ci95:.2f} points of accuracy (95% CI, t with 5 df); p = {p:.2g}."
        in out
    )
    assert (
        "With one seed in A, this compares trained models on these episodes and leaves out seed-to-seed "
        "variance: it does not tell whether one configuration is better than the other."
    ) in out
    assert "leaves out seed-to-seed variance" in (tmp_path / "report.md").read_text()
    header, a_row, b_row = table_rows(out)
    assert a_row[header.index("seeds")] == "1"


def simulated_comparisons(
    seeds_a: list[int], seeds_b: list[int], n: int = 400, episodes: int = 600
) -> list[float]:
    """The report's p-values for `n` pairs of rows of one configuration: per-episode accuracy = the
    shared episodes' difficulty + each seed's offset (std 1 point, constant over episodes) + noise."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 0.05, (n, 1, 1, episodes))  # the same fixed episodes for every run
    offsets = rng.normal(0, 0.01, (n, 2, max(len(seeds_a), len(seeds_b)), 1))  # [n, row, seed, 1]
    scores = 0.9 + difficulty + offsets + rng.normal(0, 0.15, (n, 2, offsets.shape[2], episodes))
    label = {1: "A", 2: "B"}
    p_values = []
    for i in range(n):
        rows = []
        for r, seeds in enumerate((seeds_a, seeds_b)):
            runs = []
            for s, seed in enumerate(seeds):
                run = Run(
                    Path(f"sim/{r}/{seed}"),
                    {"seed": str(seed)},
                    "finished",
                    score="accuracy",
                    episodes={
                        "score": "accuracy",
                        "identity": IDENTITY,
                        "values": scores[i, r, s].tolist(),
                    },
                )
                run.seed = str(seed)
                runs.append(run)
            rows.append(Row(r + 1, {"optimizer.lr": "0.001"}, runs))
        text = "\n".join(comparison(*rows, label, ACCURACY))
        p_values.append(float(re.search(r"\bp = ([-+0-9.e]+|nan)", text).group(1).rstrip(".")))
    return p_values


@pytest.mark.parametrize("seeds_b", [[0, 1, 2], [3, 4, 5]], ids=["paired-by-seed", "welch"])
def test_two_rows_of_one_configuration_differ_at_the_nominal_rate(seeds_b):
    # Averaging each episode over seeds and pairing the episodes (the t-test ignoring seed offsets)
    # calls about 30% of these significant; the seed as the unit, 5%.
    p_values = np.array(simulated_comparisons([0, 1, 2], seeds_b))
    assert 0.02 <= np.mean(p_values < 0.05) <= 0.08


def test_compare_selects_rows_by_override_or_number(capsys, tmp_path):
    write_pair(tmp_path)
    write_run(tmp_path / "c0", ["algorithm=matchingnet"], test=0.7, episodes=[0.7] * 6)
    code, out, err = report(capsys, tmp_path)
    assert "## Comparison" not in out and "--compare A B" in out  # three rows: nothing chosen
    mean, ci95, p = hand_paired([np.mean(v) for v in B_SEEDS], [np.mean(v) for v in A_SEEDS])
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
    assert "No test of B − A: they were not tested on the same episodes (the identities" in out
    assert "B − A =" not in out and "t-test" not in out


def test_different_episode_counts_give_a_note_and_no_test(capsys, tmp_path):
    write_pair(tmp_path, b_length=5)
    code, out, err = report(capsys, tmp_path)
    assert "No test of B − A: they were not tested on the same episodes (5 and 6 episodes)" in out
    assert "B − A =" not in out


# -- which episodes a run was tested on -----------------------------------------------------------
def folder_identity(path: Path, cache: Path, run_dir: Path) -> dict:
    """The test identity a run on the image folder `path` writes, as test_episodes.json holds it."""
    cfg = compose_config(
        "dataset=folder",
        f"dataset.path={path}",
        "dataset.image_size=16",
        f"dataset.cache_dir={cache}",
        *SMALL_RUN,
        "episode.n_query=2",
    )
    identity = protocol_identity(cfg, Experiment(cfg, parts=()).dataset)
    return json.loads(json.dumps(identity))


def test_folder_runs_pair_by_their_test_images_not_by_where_they_lie(capsys, tmp_path):
    write_folder(tmp_path / "images", n_classes=25)  # 15 / 5 / 5 classes
    shutil.copytree(tmp_path / "images", tmp_path / "moved" / "images")  # the same images elsewhere
    write_folder(
        tmp_path / "other", n_classes=25, seed=1
    )  # the same class names and counts, other pixels
    cache = tmp_path / "cache"
    original, moved, other = (
        folder_identity(tmp_path / path, cache, tmp_path / f"run-{i}")
        for i, path in enumerate(["images", "moved/images", "other"])
    )
    assert original == moved and other != original
    assert (
        "path" not in original["dataset"]
    )  # where the data lies is machine-local: the content says which
    assert original["test_images"]["classes"] == 5
    assert (
        other["test_images"]["images"] == original["test_images"]["images"]
    )  # only the pixels differ
    runs = tmp_path / "runs"
    for name, identity in [("a", original), ("b", moved), ("c", other)]:
        write_run(
            runs / name,
            [f"dataset.path={name}"],
            test=0.8,
            episodes=[0.8, 0.6, 0.9],
            identity=identity,
        )
    code, out, err = report(capsys, runs, "--compare", "1", "2")
    assert code == 0, err
    assert "B − A = +0.00 ± 0.00 points of accuracy" in out
    code, out, err = report(capsys, runs, "--compare", "1", "3")
    assert "No test of B − A: they were not tested on the same episodes (the identities" in out
    assert "B − A =" not in out


def test_a_dataset_of_drawn_tasks_is_identified_by_its_config(tmp_path):
    cfg = compose_config("+experiment=maml_sinusoid", "device=cpu")
    identity = protocol_identity(cfg, Experiment(cfg, parts=()).dataset)
    assert identity["dataset"]["amplitude"] == [0.1, 5.0] and "test_images" not in identity
    assert (identity["n_way"], identity["k_shot"], identity["episodes"]) == (
        1,
        10,
        cfg.eval.episodes,
    )


# -- damaged and partial run directories ----------------------------------------------------------
def test_a_truncated_results_json_is_a_damaged_run_not_a_finished_one(capsys, tmp_path):
    write_run(tmp_path / "0", ["optimizer.lr=0.1", "seed=0"], test=0.9, best_val=0.88)
    cut = write_run(
        tmp_path / "1", ["optimizer.lr=0.1", "seed=1"], test=0.5, best_val=0.5, val=[(3000, 0.52)]
    )
    alone = write_run(tmp_path / "2", ["optimizer.lr=0.01", "seed=0"], test=0.7)
    for run in (cut, alone):
        results = run / "results.json"
        os.truncate(results, results.stat().st_size // 2)  # a copy cut off half-way
    code, out, err = report(capsys, tmp_path)
    assert code == 1  # a result was lost
    _, both, damaged = table_rows(out)
    damage = "results.json is cut off or not a JSON object; its numbers are left out"
    # The damaged seed's numbers are absent, not averaged in as missing: the row is seed 0 alone.
    assert both[1:] == [
        "0.1",
        "90.0 ± 1.0",
        "88.0",
        "1",
        "3000",
        "2m03s",
        f"1 finished, 1 damaged: {damage}",
    ]
    assert damaged[1:] == ["0.01", "-", "-", "0", "-", "-", f"damaged: {damage}"]
    assert err.splitlines()[:2] == [
        f"metarun-report: warning: {cut}: {damage}",
        f"metarun-report: warning: {alone}: {damage}",
    ]
    assert "Traceback" not in err
    assert [row["damaged"] for row in read_csv(tmp_path / "report.csv")] == ["1", "1"]


def test_a_run_without_hydra_record_is_found_and_gets_a_row_of_its_own(capsys, tmp_path):
    write_run(tmp_path / "0", ["optimizer.lr=0.1"], test=0.9)
    write_run(tmp_path / "1", ["optimizer.lr=0.01"], test=0.8)
    lost = write_run(tmp_path / "2", ["optimizer.lr=0.001"], test=0.7, hydra_record=False)
    code, out, err = report(capsys, tmp_path)
    assert code == 0, err
    _, _, _, unknown = table_rows(out)
    assert unknown[1:3] == ["?", "70.0 ± 1.0"]
    assert (
        unknown[-1]
        == "finished: no .hydra/ record, so its overrides are unknown: it is a row of its own"
    )
    assert f"metarun-report: warning: {lost}: no .hydra/ record" in err
    code, out, err = report(capsys, lost)  # given alone, it is still a run
    assert code == 0 and table_rows(out)[1][-1].startswith("finished: no .hydra/ record")


def test_damaged_episode_and_hydra_records_are_one_line_each_never_a_traceback(capsys, tmp_path):
    write_pair(tmp_path)
    (tmp_path / "b1" / "test_episodes.json").write_text(
        '{"score": "accuracy", "values": [0.8, 1.0'
    )  # cut off
    (tmp_path / "a0" / ".hydra" / "config.yaml").write_text("a line of text, not a mapping\n")
    (tmp_path / "a1" / ".hydra" / "config.yaml").write_bytes(b"\xff\xfe\x00garbage")
    code, out, err = report(capsys, tmp_path)
    assert code == 0 and "Traceback" not in err
    assert f"No test of B − A: the test_episodes.json of {tmp_path / 'b1'} is damaged." in out
    assert (
        f"metarun-report: warning: {tmp_path / 'b1'}: test_episodes.json is cut off or not a JSON object"
        in err
    )
    assert (
        f"metarun-report: warning: {tmp_path / 'a0'}: .hydra/config.yaml is cut off or not a YAML mapping"
        in err
    )
    assert (
        f"metarun-report: warning: {tmp_path / 'a1'}: .hydra/config.yaml is cut off or not a YAML mapping"
        in err
    )
    _, a, b = table_rows(out)
    assert (
        a[2] == "68.3 ± 2.4"
        and b[-1] == "2 finished: test_episodes.json is cut off or not a JSON object"
    )


def test_a_transductive_row_compared_with_an_inductive_one_is_said_so():
    from metarun.report import Row, Run, head_text, transductive_note

    inductive = Row(1, {}, [Run(Path("a"), {}, "finished", head="logreg", transductive=False)])
    transductive = Row(2, {}, [Run(Path("b"), {}, "finished", head="tim", transductive=True)])
    assert head_text(transductive) == "tim, transductive" and head_text(inductive) == "logreg"
    note = transductive_note(inductive, transductive)
    assert note and note[0].startswith("B is transductive")
    assert transductive_note(inductive, inductive) == []
