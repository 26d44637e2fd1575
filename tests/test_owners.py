"""Each fact about a run has one owner: the run directory's file names are spelled in
metarun/run_dir.py alone, a score's direction is decided in metarun/score.py alone, and reading a
trained run back builds no optimizer (metarun.experiment, not the Trainer)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import metarun
from metarun import run_dir
from metarun.score import SCORES
from tests.conftest import REPO

PACKAGE = REPO / "metarun"
FILE_NAMES = {
    *run_dir.MARKERS,
    *run_dir.TRAINED,
    run_dir.LOCK,
    "checkpoints",
    "best.pt",
    "last.pt",
    "config.yaml",
    "overrides.yaml",
    "hydra.yaml",
    "tb",
    "adaptation.png",
}
SCORE_KEYS = {key for name in SCORES for key in (name, f"test_{name}", f"best_val_{name}")}


def sources(*except_files: str) -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p.name not in except_files]


def docstrings(tree: ast.AST) -> set[int]:
    """The ids of the string constants that are docstrings (prose, not values)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def constants(path: Path) -> list[tuple[int, str, ast.AST]]:
    """(line, value, parent) of each string constant that is not a docstring or inside an f-string
    (messages name files in prose: 'no results.json')."""
    tree = ast.parse(path.read_text())
    prose = docstrings(tree)
    inside_messages = {
        id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values
    }
    found = []
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            if (
                isinstance(child, ast.Constant)
                and isinstance(child.value, str)
                and id(child) not in prose | inside_messages
            ):
                found.append((child.lineno, child.value, parent))
    return found


def test_only_run_dir_spells_the_files_of_a_run_directory():
    spelled = [
        f"{path.relative_to(REPO)}:{line}: {value!r}"
        for path in sources("run_dir.py")
        for line, value, _ in constants(path)
        if value in FILE_NAMES
    ]
    assert not spelled, "use metarun.run_dir's names instead: " + "; ".join(spelled)


def test_only_score_decides_which_score_a_run_has_and_which_way_is_better():
    """No comparison with a score's name or its results.json keys outside metarun/score.py: code
    that needs the direction, the format or the key asks a `Score`."""
    compared = [
        f"{path.relative_to(REPO)}:{line}: {value!r}"
        for path in sources("score.py")
        for line, value, parent in constants(path)
        if value in SCORE_KEYS and isinstance(parent, ast.Compare)
    ]
    assert not compared, "look the score up in metarun.score instead: " + "; ".join(compared)


def test_the_owner_checks_see_a_file_name_and_a_score_comparison(tmp_path):
    """The two checks above can fail: they find what they forbid in a module that has it."""
    module = tmp_path / "bad.py"
    module.write_text(
        '"""results.json in prose is fine."""\nX = run / "results.json"\nY = s == "mse"\n'
    )
    assert [value for _, value, _ in constants(module)] == ["results.json", "mse"]
    assert isinstance(constants(module)[1][2], ast.Compare)


def test_metarun_load_builds_no_optimizer(monkeypatch, trained_protonet_run):
    """Reading a trained run back (metarun.load, metarun-eval) builds its parts, never the
    Trainer's optimizer, scheduler or scaler."""
    built = []
    for cls in (torch.optim.Optimizer, torch.amp.GradScaler, torch.optim.lr_scheduler.LRScheduler):
        init = cls.__init__

        def recording(self, *args, _init=init, **kwargs):
            built.append(type(self).__name__)
            _init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", recording)
    torch.optim.Adam(
        [torch.zeros(1, requires_grad=True)]
    )  # the recording sees one when it is built
    assert built == ["Adam"]
    built.clear()
    model = metarun.load(trained_protonet_run, device="cpu")
    assert model.learner is not None and built == []


@pytest.fixture(scope="module")
def trained_protonet_run(tmp_path_factory, omniglot_root, omniglot_cache):
    from tests.trained_runs import trained_run

    return trained_run("protonet", tmp_path_factory, omniglot_root, omniglot_cache)[0]
