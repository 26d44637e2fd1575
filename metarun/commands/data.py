"""`metarun-data NAME [key=value ...]`: check a dataset before training on it.

Composes `conf/dataset/NAME.yaml` with the given keys (the dataset's own: `root=...`, or written
in full as `dataset.root=...`), builds it as a run would (decoding it into the cache now, with a
progress bar, if the cache is missing or stale) and prints the layout it found, the classes and
images of each part, the image shape and normalization, and the cache. A problem is one line naming
the fix, and exit code 2.
"""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_module

from metarun import config  # noqa: F401  (registers the schema that conf/config.yaml names)
from metarun.config import build, check_resolves, check_target_arguments
from metarun.data.contract import TaskDataset
from metarun.errors import MetarunError, warnings_as_lines
from metarun.hydra_errors import one_line_composition_errors

USAGE = """usage: metarun-data NAME [key=value ...]

Check dataset NAME (a file in conf/dataset/: omniglot, miniimagenet, cifarfs, fc100, folder),
with its keys set as a run would set them, e.g.
  metarun-data miniimagenet root=/data/miniimagenet
  metarun-data folder path=~/my-images split=[0.6,0.2,0.2]
It builds the decoded-image cache if it is missing and prints what a run would read."""


def dataset_overrides(name: str, pairs: list[str]) -> list[str]:
    """`root=/x` -> `dataset.root=/x`; keys already written as `dataset.*` stay as they are."""
    overrides = [f"dataset={name}"]
    for pair in pairs:
        if "=" not in pair:
            raise MetarunError(f"{pair!r} is not key=value; write e.g. root=/data/{name}")
        overrides.append(pair if pair.lstrip("+~").startswith("dataset.") else f"dataset.{pair}")
    return overrides


def report(dataset) -> str:
    """The lines `metarun-data` prints for a built dataset."""
    lines = [f"dataset  {dataset.name} ({type(dataset).__module__}.{type(dataset).__name__})"]
    lines += [f"{key:<8} {value}" for key, value in dataset.layout().items()]
    if isinstance(
        dataset, TaskDataset
    ):  # tasks drawn on the fly (sinusoid): nothing stored to count
        return "\n".join(
            lines + [f"items    {'x'.join(map(str, dataset.input_shape))} numbers, drawn per task"]
        )
    lines.append(
        f"images   {'x'.join(map(str, dataset.input_shape))} uint8; normalized with "
        f"mean {fmt(dataset.mean)}, std {fmt(dataset.std)}"
    )
    lines.append(f"{'part':<8} {'classes':>8} {'images':>8}  images per class")
    for part in dataset.parts:
        counts = dataset.part(part).counts
        low, high = int(counts.min()), int(counts.max())
        per_class = str(low) if low == high else f"{low} to {high}"
        lines.append(f"{part:<8} {len(counts):>8} {int(counts.sum()):>8}  {per_class}")
    return "\n".join(lines)


def fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    warnings_as_lines("metarun-data")
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    try:
        with one_line_composition_errors(prog="metarun-data"):
            with initialize_config_module("metarun.conf", version_base="1.3"):
                cfg = compose("config", overrides=dataset_overrides(args[0], args[1:]))
        check_resolves(cfg.dataset)
        check_target_arguments("dataset", cfg.dataset)
        print(report(build(cfg.dataset)))
    except MetarunError as e:
        print(f"metarun-data: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
