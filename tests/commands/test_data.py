"""`metarun-data NAME [key=value ...]`: what a dataset holds, or one line naming the problem."""

from __future__ import annotations

import pytest

from metarun.commands.data import main


def data_check(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_reports_layout_classes_images_and_shape_of_a_folder(capsys, colour_datasets, tmp_path):
    path = next(o for o in colour_datasets["folder"] if o.startswith("dataset.path=")).split(
        "=", 1
    )[1]
    code, out, err = data_check(
        capsys, "folder", f"path={path}", "image_size=20", f"cache_dir={tmp_path}"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "dataset  folder (metarun.data.folder.ImageFolder)"
    assert "class folders split [0.6, 0.2, 0.2] with seed 0" in out
    assert "images   3x20x20 uint8" in out
    parts = {
        line.split()[0]: line.split()[1:]
        for line in lines
        if line.split()[0] in ("train", "val", "test")
    }
    assert [parts[p][0] for p in ("train", "val", "test")] == ["15", "5", "5"]  # classes per part
    assert parts["train"][2:] == ["6", "to", "12"]  # ragged: images per class
    assert list(tmp_path.glob("folder-20px-3c-*.pt"))  # the cache was built now


def test_reports_the_cifar_fs_parts(capsys, colour_datasets):
    code, out, err = data_check(capsys, "cifarfs", *colour_datasets["cifarfs"][1:])
    assert code == 0, err
    assert [line.split()[:3] for line in out.splitlines()[-3:]] == [
        ["train", "64", "512"],
        ["val", "16", "128"],
        ["test", "20", "160"],
    ]


def test_reports_a_dataset_of_drawn_tasks_without_parts(capsys):
    code, out, err = data_check(capsys, "sinusoid")
    assert code == 0, err
    assert out.splitlines()[0] == "dataset  sinusoid (metarun.data.sinusoid.Sinusoid)"
    assert out.splitlines()[-1] == "items    1 numbers, drawn per task"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("miniimagenet", "root=/nonexistent/mini"),
            "no mini-ImageNet under /nonexistent/mini: put the JPEGs in",
        ),
        (("folder",), "dataset.path must be set; pass dataset.path=<value>"),
        (
            ("imagenet",),
            "Could not find 'dataset/imagenet'; choose one of: cifarfs, fc100, folder, miniimagenet, omniglot",
        ),
        (("omniglot", "rooot=/x"), "unknown config key dataset.rooot; did you mean dataset.root?"),
        (("omniglot", "root"), "'root' is not key=value"),
        (
            ("cifarfs", "root=/nonexistent", "download=false"),
            "CIFAR-100 under /nonexistent is missing",
        ),
    ],
)
def test_a_problem_is_one_line_and_exit_2(capsys, args, message):
    code, out, err = data_check(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("metarun-data: error: ") and err.count("\n") == 1
    assert message in err
