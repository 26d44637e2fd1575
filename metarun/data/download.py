"""Downloading a dataset archive, shared by every dataset that may be downloaded for the user."""

from __future__ import annotations

from pathlib import Path

from metarun.errors import MetarunError


def download_and_extract(url: str, into: Path, md5: str, missing: str, fix: str) -> None:
    """torchvision's checked download and extraction of `url` into `into`; a failure (offline, proxy,
    bad checksum) is one MetarunError line: `missing` (what is not there), the reason, and `fix`."""
    # Imported here: torchvision is only needed when there is something to download.
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(url, str(into), filename=url.rsplit("/", 1)[1], md5=md5)
    except Exception as e:
        raise MetarunError(f"{missing} and downloading it failed ({one_line(e)}); {fix}") from None


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message squeezed onto one line, for error messages that quote a cause."""
    return " ".join(str(error).split())[:limit] or type(error).__name__
