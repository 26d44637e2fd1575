"""The shared dataset cache: two processes that need one cache at once decode it once and read the
same data; a truncated or garbage cache file is rebuilt with one warning line."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from metarun.data.cache import fingerprint, load_or_build, source_fingerprint, stats_under
from metarun.data.folder import ImageFolder
from tests.conftest import REPO
from tests.fixtures.folder import write_folder

# Builds the folder dataset once both processes are ready, its decoding slowed to a second so that
# the second process asks for the cache while the first is still writing it. Each decode appends
# the pid to BUILDS; the process prints a hash of the images it got.
BUILD_AT_ONCE = """
import hashlib, os, sys, time
from pathlib import Path
from metarun.data.folder import ImageFolder
path, cache, ready, builds = map(Path, sys.argv[1:])
decode = ImageFolder._decode
def slow_decode(self, *args):
    with builds.open("a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1)
    return decode(self, *args)
ImageFolder._decode = slow_decode
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < 2:
    time.sleep(0.01)
data = ImageFolder(str(path), image_size=8, cache_dir=str(cache))
digest = hashlib.sha256()
for part in ("train", "val", "test"):
    digest.update(data.part(part).images.numpy().tobytes() + data.part(part).counts.numpy().tobytes())
print(digest.hexdigest())
"""


def test_two_processes_needing_one_cache_at_once_decode_it_once_and_read_the_same_data(tmp_path):
    write_folder(tmp_path / "images", n_classes=6)
    (tmp_path / "ready").mkdir()
    folders = [str(tmp_path / name) for name in ("images", "cache", "ready", "builds")]
    command = [sys.executable, "-c", BUILD_AT_ONCE, *folders]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err for _, err in outputs]
    assert (
        len((tmp_path / "builds").read_text().splitlines()) == 1
    )  # the second waited, then read the cache
    assert outputs[0][0] == outputs[1][0] and len(outputs[0][0].strip()) == 64
    # One cache file and nothing else: no temporary file, no lock file left.
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".pt"]


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":  # as a full disk or a killed copy leaves it
        os.truncate(path, len(data) // 2)
    else:
        path.write_bytes(os.urandom(len(data)))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_cache_file_is_rebuilt_with_one_warning(tmp_path, how):
    write_folder(tmp_path / "images", n_classes=6)
    build = lambda: ImageFolder(
        str(tmp_path / "images"), image_size=8, cache_dir=str(tmp_path / "cache")
    )
    original = build()
    [cache] = (tmp_path / "cache").iterdir()
    damage(cache, how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = build()
    [message] = [str(w.message) for w in caught]
    assert message.startswith(f"the dataset cache {cache} is damaged (") and "\n" not in message
    assert message.endswith("not a whole torch file: cut short or overwritten); rebuilding it")
    assert torch.equal(rebuilt.part("train").images, original.part("train").images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read back whole: no warning
        again = build()
    assert torch.equal(again.part("test").images, original.part("test").images)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.name]


def test_a_damaged_cache_is_one_warning_line_on_the_command_line(tmp_path):
    write_folder(tmp_path / "images", n_classes=6)
    check = [
        sys.executable,
        "-m",
        "metarun.commands.data",
        "folder",
        f"path={tmp_path / 'images'}",
        "image_size=8",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    ImageFolder(
        str(tmp_path / "images"), image_size=8, cache_dir=str(tmp_path / "cache")
    )  # what metarun-data reads
    [cache] = (tmp_path / "cache").iterdir()
    damage(cache, "truncated")
    result = subprocess.run(
        check, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(
        f"metarun-data: warning: the dataset cache {cache} is damaged ("
    )
    assert result.stderr.endswith("); rebuilding it\n") and result.stderr.count("\n") == 1
    assert "train" in result.stdout


def test_a_cache_of_other_sources_is_rebuilt_without_a_warning(tmp_path):
    path = tmp_path / "data.pt"
    load_or_build(path, "source 1", lambda: {"x": torch.zeros(3)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        payload = load_or_build(path, "source 2", lambda: {"x": torch.ones(3)})
    assert torch.equal(payload["x"], torch.ones(3))
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))


def test_the_listed_fingerprint_is_the_one_of_the_files_and_follows_their_changes(tmp_path):
    # Names whose string order differs from Path order ("a-b/x" < "a/x" as strings, not as parts).
    for name in ("a/x.png", "a-b/x.png", "a/b/y.png", "ab.png", ".hidden/z.png", "a/.dot.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and ".hidden" not in p.parts)
    files = [p for p in files if not p.name.startswith(".")]
    assert [path for path, _ in stats_under(tmp_path)] == [str(p) for p in files]
    before = fingerprint(stats_under(tmp_path), 28)
    assert before == source_fingerprint(files, 28)  # so caches written before stay valid
    (tmp_path / "a/b/y.png").write_bytes(b"changed, longer")
    assert fingerprint(stats_under(tmp_path), 28) != before
