"""The on-disk cache of decoded images that every dataset shares.

A dataset decodes its source files once into a dict of tensors (uint8 images, class counts, names)
and keeps it in one file per (dataset, part, image size, root) under `dataset.cache_dir` (default
`$METARUN_CACHE`, else `~/.cache/metarun`). The file is written atomically and memory-mapped when
read back, so mini-ImageNet's 0.8 GB training part loads in well under a second and pages in as
episodes touch it. It records a fingerprint of its source (each file's path, size and mtime): a
changed, added or removed source file rebuilds it; so does a truncated or foreign cache file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from metarun.atomic import write_atomically


def default_cache_dir() -> Path:
    return Path(os.environ.get("METARUN_CACHE") or Path.home() / ".cache" / "metarun")


def cache_file(cache_dir: str | Path | None, dataset: str, root: str | Path, *tags: object) -> Path:
    """`<cache_dir>/<dataset>-<tags...>-<hash of root>.pt`: the hash tells two data folders apart."""
    root_hash = hashlib.sha1(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:10]
    stem = "-".join([dataset, *map(str, tags), root_hash])
    return Path(cache_dir or default_cache_dir()).expanduser() / f"{stem}.pt"


def files_under(folder: Path) -> list[Path]:
    """Every file below `folder` but hidden ones, sorted (os.scandir: 4x faster than Path.rglob)."""
    files, folders = [], [Path(folder)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                (folders if entry.is_dir() else files).append(Path(entry.path))
    return sorted(files)


def source_fingerprint(files: Iterable[Path], *settings: object) -> str:
    """A hash of each file's path, size and modification time, and of the decoding `settings`."""
    digest = hashlib.sha1(repr(settings).encode())
    for path in sorted(files):
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_or_build(path: Path, source: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The payload cached at `path` if it was built from `source`; else `build()`, cached, returned."""
    if path.is_file():
        try:
            payload = torch.load(path, mmap=True, weights_only=True)
            if isinstance(payload, dict) and payload.get("source") == source:
                return payload
        except Exception:
            pass  # truncated or foreign: build it again and overwrite it
    payload = {**build(), "source": source}
    write_atomically(path, lambda f: torch.save(payload, f))
    return payload
