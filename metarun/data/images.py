"""Decoding image files into uint8 tensors: any format PIL reads, any size, grey or colour."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

MODES = {1: "L", 3: "RGB"}


def read_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image file as uint8 `[channels, image_size, image_size]` (decode_image)."""
    with Image.open(path) as img:
        return decode_image(img, image_size, channels)


def decode_image(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """A PIL image as uint8 `[channels, image_size, image_size]`: grey or RGB, resized. PIL's
    BILINEAR widens its kernel when downscaling (antialiasing), as torchvision's Resize does."""
    img = img.convert(MODES[channels]).resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def read_images(
    paths: list[Path], image_size: int, channels: int, desc: str
) -> tuple[torch.Tensor, list[tuple[Path, str]]]:
    """Decode `paths` (PIL releases the GIL, so threads decode in parallel) with a progress bar.

    Returns uint8 `[len(paths), C, S, S]` and the (path, reason) of each file PIL could not read,
    whose slot is left zero: callers name them and decide whether to drop them or stop.
    """
    out = np.zeros((len(paths), channels, image_size, image_size), dtype=np.uint8)  # [I, C, S, S]
    failures: list[tuple[Path, str]] = []

    def decode(i: int) -> None:
        try:
            out[i] = read_image(paths[i], image_size, channels)
        except Exception as e:  # missing, truncated, not an image: named by the caller
            failures.append((paths[i], " ".join(str(e).split())[:120] or type(e).__name__))

    with ThreadPoolExecutor(max_workers=min(8, (torch.get_num_threads() or 1) * 2)) as pool:
        for _ in tqdm(
            pool.map(decode, range(len(paths))),
            total=len(paths),
            desc=desc,
            unit="img",
            disable=None,
            leave=False,
        ):
            pass
    return torch.from_numpy(out), sorted(failures)


def describe_failures(failures: list[tuple[Path, str]], limit: int = 3) -> str:
    """'3 files: a.jpg (reason), b.jpg (reason), ...': the first few and how many."""
    shown = ", ".join(f"{path} ({reason})" for path, reason in failures[:limit])
    more = f" and {len(failures) - limit} more" if len(failures) > limit else ""
    return f"{len(failures)} file{'s' if len(failures) != 1 else ''}: {shown}{more}"


def resize(images: torch.Tensor, size: int, chunk: int = 1000) -> torch.Tensor:
    """uint8 `[I, C, H, W]` as `[I, C, size, size]`, bilinear and antialiased like PIL's resize in
    read_image; in chunks, because 38,400 mini-ImageNet images as floats would take 3 GB."""
    if images.shape[-2:] == (size, size):
        return images
    return torch.cat(
        [
            F.interpolate(
                batch.float(),
                size=(size, size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            .round_()
            .clamp_(0, 255)
            .to(torch.uint8)
            for batch in images.split(chunk)
        ]
    )
