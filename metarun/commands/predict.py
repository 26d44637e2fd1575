"""`metarun-predict RUN_DIR --support DIR --query DIR_OR_FILE ... [--out predictions.csv]`: a trained
run adapted to your own support images, classifying your query images (metarun.load's `adapt` and
`predict_proba`). DIR holds one sub-folder of images per class; writes a CSV of file, predicted class
and each class's probability, and prints a short table. Bad input is one line and exit code 2.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import Tensor

from metarun.data.folder import class_folders, visible
from metarun.errors import MetarunError, OneLineArgumentParser, warnings_as_lines
from metarun.predict import read_run


def read_support(folder: Path) -> tuple[list[Path], list[str]]:
    """Every image of `folder`'s class sub-folders, with the sub-folder's name as its label."""
    if not folder.is_dir():
        raise MetarunError(
            f"--support {folder} is not a directory; give a folder holding one sub-folder of images per class"
        )
    classes = class_folders(folder)
    if not classes:
        raise MetarunError(
            f"--support {folder} holds no class folders; put one sub-folder of images per class in it"
        )
    for name, files in classes:
        if not files:
            raise MetarunError(
                f"support class {name} ({folder / name}) holds no images; "
                "put at least one image in it or remove the folder"
            )
    return [f for _, files in classes for f in files], [
        name for name, files in classes for _ in files
    ]


def find_queries(paths: Sequence[Path]) -> list[Path]:
    """The files given, and every visible file below the folders given, sorted per folder."""
    found = []
    for path in paths:
        if path.is_dir():
            files = below(path)
            if not files:
                raise MetarunError(
                    f"--query {path} holds no files; give image files or folders of them"
                )
            found += files
        elif path.is_file():
            found.append(path)
        else:
            raise MetarunError(
                f"--query {path} does not exist; give image files or folders of them"
            )
    return found


def below(folder: Path) -> list[Path]:
    files = []
    for entry in visible(folder):
        files += below(entry) if entry.is_dir() else [entry] if entry.is_file() else []
    return files


def write_predictions(path: Path, files: list[Path], classes: Sequence[Any], proba: Tensor) -> None:
    """CSV: file, predicted class, then one column per class with its probability."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "predicted", *classes])
        for file, chosen, row in zip(files, proba.argmax(dim=-1).tolist(), proba.tolist()):
            writer.writerow([file, classes[chosen], *(f"{p:.6f}" for p in row)])


def show(files: list[Path], classes: Sequence[Any], proba: Tensor, limit: int = 20) -> str:
    """The first `limit` predictions as a table: file, predicted class, its probability."""
    chosen = proba.argmax(dim=-1)  # [M]
    best = proba.gather(1, chosen[:, None])[:, 0]  # [M]
    names = [str(f) for f in files[:limit]]
    width = max(len("file"), *(len(n) for n in names))
    lines = [f"{'file':<{width}}  {'predicted':<20}  p"]
    lines += [
        f"{n:<{width}}  {str(classes[c]):<20}  {p:.3f}"
        for n, c, p in zip(names, chosen.tolist(), best.tolist())
    ]
    if len(files) > limit:
        lines.append(f"... and {len(files) - limit} more")
    return "\n".join(lines)


def parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="metarun-predict",
        description="Adapt a trained run to a support set of your own and classify query images.",
    )
    p.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a run directory (outputs/<date>/<time>_...)"
    )
    p.add_argument(
        "--support",
        type=Path,
        required=True,
        metavar="DIR",
        help="one sub-folder of images per class",
    )
    p.add_argument(
        "--query",
        type=Path,
        nargs="+",
        required=True,
        metavar="DIR_OR_FILE",
        help="image files, or folders whose files (also in sub-folders) are classified",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("predictions.csv"),
        help="the CSV to write (default: %(default)s)",
    )
    p.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default=None,
        help="the checkpoint to read, also of a run that has not finished (default: the one a finished run tested, best unless train.test_checkpoint=last)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--head",
        metavar="NAME",
        help="classify with this head (conf/head/, as eval.head) instead of the run's own classifier",
    )
    return p


def main(argv: Optional[list[str]] = None) -> None:
    warnings_as_lines("metarun-predict")
    args = parser().parse_args(argv)
    try:
        support, labels = read_support(args.support)
        queries = find_queries(args.query)
        model = read_run(
            args.run_dir, args.checkpoint, args.device, option="--checkpoint {}", head=args.head
        )
        task = model.adapt(support, labels)
        proba = task.predict_proba(queries)
    except MetarunError as e:
        print(f"metarun-predict: error: {e}", file=sys.stderr)
        sys.exit(2)
    write_predictions(args.out, queries, task.classes, proba)
    print(show(queries, task.classes, proba))
    print(f"wrote {args.out}: {len(queries)} images, {len(task.classes)} classes")


if __name__ == "__main__":
    main()
