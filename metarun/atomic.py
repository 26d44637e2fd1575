"""Files that are either wholly the old version or wholly the new one, whenever a run is killed or
its disk fills up; a write that fails as one line naming the file and the free space; and a probe
that a folder can be written, before anything is.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from metarun.errors import MetarunError, RunFailed


class WriteFailed(RunFailed):
    """Writing `path` failed: a full disk, a file-size limit, an I/O error. `fix` ends the line;
    `with_fix` gives the same failure with the fix its caller knows better."""

    def __init__(
        self,
        path: str | Path,
        error: OSError,
        fix: str = "free space there or write somewhere else",
    ):
        self.path, self.error = Path(path), error
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(
            f"cannot write {path}: {reason} ({free_space(Path(path))} free there); {fix}"
        )

    def with_fix(self, fix: str) -> WriteFailed:
        failed = WriteFailed(self.path, self.error, fix)
        failed.__cause__ = self.error
        return failed


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it over `path` (atomic on POSIX).
    A write that fails (WriteFailed) leaves `path` as it was and no temporary file."""
    tmp = None
    try:
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(
                tmp, 0o644
            )  # mkstemp makes 0600; run directories and caches are shared read-only
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """Raise a failed write in the block as WriteFailed naming `path`. torch.save reports one as a
    RuntimeError from its C++ writer, with the OSError as its context: the chain is searched."""
    try:
        yield
    except MetarunError:
        raise
    except Exception as e:
        cause = os_error(e)
        if cause is None:
            raise
        raise WriteFailed(path, cause) from e


def check_writable(folder: Path, fix: str) -> None:
    """A MetarunError line (ending in `fix`) unless a file can be made in `folder`, or in its nearest
    existing parent when it is yet to be made: a probe file, removed again at once."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file, not a folder")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".metarun-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MetarunError(f"cannot write in {folder} ({e.strerror or e}); {fix}") from e


def os_error(error: BaseException) -> OSError | None:
    """The OSError that `error` is, or that caused it (its __cause__ / __context__ chain)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def free_space(path: Path) -> str:
    """'12.3 GB' / '512.0 MB': what the file system holding `path` (or its nearest existing parent) has free."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return "unknown space"
    return f"{free / 1e9:.1f} GB" if free >= 1e9 else f"{free / 1e6:.1f} MB"
