"""Augmentation of episode images, with its own random parameters for every image.

Meta-training augments the support set (and, if asked, the query set) of each episode the way the
few-shot pipelines do: natural images get a padded random crop (RandomCrop(size, padding=p) of
MetaOptNet / LibFewShot), a horizontal flip and a colour jitter; Omniglot a small RandomAffine.

Images are one batch `[n, C, H, W]` float in [0, 1], C in {1, 3}, on any device. Every random
number comes from the run's `torch.Generator`, so a resumed run draws what an uninterrupted one
would. torchvision's v2 transform classes draw one parameter set per call from the global RNG (one
crop for the whole batch), and v2.functional takes each factor or angle as one Python number, so
per-image parameters would need a Python loop per image. Here the geometric ops become one affine
matrix per image and one `grid_sample`; the colour ops are ColorJitter's blends with per-image
factors. Only `rgb_to_grayscale`, which takes no parameters, is borrowed from v2.functional.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
import torch.nn.functional as nnf
from torch import Tensor
from torchvision.transforms.v2.functional import rgb_to_grayscale

from metarun.errors import MetarunError

# What each op setting means when neither the config nor the dataset's standard sets it.
OFF = {
    "crop_padding": 0,
    "flip": False,
    "color_jitter": 0.0,
    "rotate": 0.0,
    "translate": 0.0,
    "scale": 0.0,
    "resized_crop": 0.0,
}
GEOMETRIC = ("shift", "flip", "angle", "translate", "scale", "crop_size")
# RandomResizedCrop's aspect ratios (torchvision's default): the crop's width / height in [3/4, 4/3].
CROP_RATIO = (3 / 4, 4 / 3)


class Augment:
    """Per-image random augmentation; `None` settings mean "the dataset's standard" (see `resolve`).

    crop_padding  shift by an integer in [-p, p] pixels in x and y, zero fill (padded random crop)
    flip          horizontal flip with probability 0.5
    color_jitter  brightness, contrast, saturation factors each in [max(0, 1 - j), 1 + j]
    rotate        angle in [-rotate, rotate] degrees about the centre
    translate     shift in [-translate, translate] times the side, in x and y
    scale         zoom factor in [1 - scale, 1 + scale]
    resized_crop  a crop of area a * H * W, a in [resized_crop, 1], aspect ratio in [3/4, 4/3] (log-
                  uniform), at a uniform position, resized to the image (RandomResizedCrop with
                  scale=(resized_crop, 1); a side longer than the image is cut to it, where
                  torchvision draws again up to 10 times)
    support/query which sets of a training episode the sampler augments
    """

    def __init__(
        self,
        support: bool = True,
        query: bool = False,
        crop_padding: Optional[int] = None,
        flip: Optional[bool] = None,
        color_jitter: Optional[float] = None,
        rotate: Optional[float] = None,
        translate: Optional[float] = None,
        scale: Optional[float] = None,
        resized_crop: Optional[float] = None,
    ):
        settings = dict(
            crop_padding=crop_padding,
            flip=flip,
            color_jitter=color_jitter,
            rotate=rotate,
            translate=translate,
            scale=scale,
            resized_crop=resized_crop,
        )
        for key, value in dict(support=support, query=query, **settings).items():
            if value is not None:
                _check(key, value)
        self.support, self.query = support, query
        self.crop_padding, self.flip, self.color_jitter = crop_padding, flip, color_jitter
        self.rotate, self.translate, self.scale = rotate, translate, scale
        self.resized_crop = resized_crop

    def settings(self) -> dict:
        return {key: getattr(self, key) for key in OFF}

    def __repr__(self) -> str:
        settings = dict(support=self.support, query=self.query, **self.settings())
        return f"Augment({', '.join(f'{k}={v}' for k, v in settings.items())})"

    def resolve(self, standard: dict) -> Augment:
        """A copy whose unset (None) op settings come from the dataset's `standard`, the rest off."""
        unknown = set(standard) - set(OFF)
        if unknown:
            raise ValueError(
                f"standard augment has unknown keys {sorted(unknown)}; known: {', '.join(OFF)}"
            )
        merged = {
            key: next(v for v in (own, standard.get(key), OFF[key]) if v is not None)
            for key, own in self.settings().items()
        }
        return Augment(self.support, self.query, **merged)

    @property
    def active(self) -> bool:
        return any(bool(value) for value in self.settings().values())

    def draw(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Parameters of the ops that are on, for n images, on generator.device. The order of these
        calls is the generator's stream: changing it changes every later episode of a run."""
        device = generator.device
        uniform = lambda low, high, *shape: (
            low + (high - low) * torch.rand(n, *shape, generator=generator, device=device)
        )
        params = {}
        if self.crop_padding:
            p = self.crop_padding
            params["shift"] = torch.randint(
                -p, p + 1, (n, 2), generator=generator, device=device
            )  # [n, (x, y)] px
        if self.flip:
            params["flip"] = torch.rand(n, generator=generator, device=device) < 0.5  # [n]
        if self.rotate:
            params["angle"] = uniform(-self.rotate, self.rotate)  # [n] degrees
        if self.translate:
            params["translate"] = uniform(
                -self.translate, self.translate, 2
            )  # [n, (x, y)] fraction of side
        if self.scale:
            params["scale"] = uniform(1 - self.scale, 1 + self.scale)  # [n]
        if self.resized_crop:
            area = uniform(self.resized_crop, 1.0)
            low, high = (math.log(r) for r in CROP_RATIO)
            ratio = uniform(low, high).exp()
            size = torch.stack([(area * ratio).sqrt(), (area / ratio).sqrt()], -1).clamp(max=1)
            params["crop_size"] = size  # [n, (w, h)] fraction of the side
            params["crop_centre"] = uniform(-1, 1, 2) * (1 - size)  # [n, (x, y)] normalized
        if self.color_jitter:
            j = self.color_jitter
            for factor in ("brightness", "contrast", "saturation"):
                params[factor] = uniform(max(0.0, 1 - j), 1 + j)  # [n]
        return params

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """`images` [n, C, H, W] float in [0, 1] transformed by `params` (from `draw`); same shape,
        dtype and range. The input itself comes back when no op is on."""
        params = {key: value.to(images.device) for key, value in params.items()}
        if any(key in params for key in GEOMETRIC):
            # Crop shifts and flips alone land on pixel centres, where nearest is bit-exact; bilinear
            # there is off by up to ~3e-5 from rounding in the grid.
            exact = not any(key in params for key in ("angle", "translate", "scale", "crop_size"))
            grid = nnf.affine_grid(_theta(params, images), list(images.shape), align_corners=False)
            images = nnf.grid_sample(
                images,
                grid,
                mode="nearest" if exact else "bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
        if "brightness" in params:
            # ColorJitter's definitions with one factor per image; it applies them in a random order
            # per call, here always brightness, contrast, saturation.
            factor = lambda key: params[key].to(images.dtype).view(-1, 1, 1, 1)
            grey = lambda x: x if x.shape[1] == 1 else rgb_to_grayscale(x)
            images = (images * factor("brightness")).clamp_(0, 1)
            images = _blend(
                images, grey(images).mean(dim=(1, 2, 3), keepdim=True), factor("contrast")
            )
            if images.shape[1] == 3:
                images = _blend(images, grey(images), factor("saturation"))
        return images

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(images, self.draw(len(images), generator))


def _theta(params: dict[str, Tensor], images: Tensor) -> Tensor:
    """`[n, 2, 3]` map from output to input coordinates (normalized, as affine_grid takes them) of
    the geometric ops: input -> resized crop -> rotate and scale about the centre -> translate ->
    crop shift -> flip."""
    n, _, H, W = images.shape
    like = dict(device=images.device, dtype=images.dtype)
    inverse = torch.eye(2, **like).repeat(n, 1, 1)  # [n, 2, 2], pixels, undoes rotate and scale
    if "angle" in params:
        angle = torch.deg2rad(params["angle"].to(images.dtype))
        cos, sin = angle.cos(), angle.sin()
        # Rows of R(-angle) with y pointing down: positive angles turn counter-clockwise on screen.
        inverse = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    if "scale" in params:
        inverse = inverse / params["scale"].to(images.dtype).view(-1, 1, 1)
    move = torch.zeros(n, 2, **like)  # [n, (x, y)] pixels
    if "translate" in params:
        move = move + params["translate"].to(images.dtype) * torch.tensor([W, H], **like)
    if "shift" in params:
        move = move + params["shift"].to(images.dtype)
    offset = -(inverse @ move[..., None])[..., 0]  # [n, 2]
    if "flip" in params:
        inverse[:, :, 0] *= 1 - 2 * params["flip"].to(images.dtype)[:, None]
    half = torch.tensor(
        [W / 2, H / 2], **like
    )  # normalized -> pixels, so rotations stay rigid when H != W
    inverse, offset = inverse * half / half[:, None], offset / half  # normalized coordinates
    if "crop_size" in params:  # the crop, resized to the image, is what the other ops transform
        size = params["crop_size"].to(images.dtype)
        inverse = size[..., None] * inverse
        offset = size * offset + params["crop_centre"].to(images.dtype)
    return torch.cat([inverse, offset[..., None]], dim=2)


def _blend(image: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """torchvision's blend, clamped after each op as ColorJitter does."""
    return (image * ratio + other * (1 - ratio)).clamp_(0, 1)


def _check(key: str, value) -> None:
    """One-line error naming the config key when a setting is out of range."""
    name = f"augment.{key}={value}"
    if key in ("support", "query", "flip"):
        if not isinstance(value, bool):
            raise MetarunError(
                f"{name} must be true or false; set augment.{key}=true or augment.{key}=false"
            )
        return
    if key == "crop_padding":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MetarunError(
                f"{name} must be >= 0; set augment.crop_padding to a pixel count, e.g. 4, or 0 for off"
            )
        return
    limits = {
        "color_jitter": (1, True, "0.4"),
        "rotate": (180, True, "10"),
        "translate": (1, True, "0.1"),
        "scale": (1, False, "0.1"),
        "resized_crop": (1, True, "0.08"),
    }
    high, closed, example = limits[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(value)
        or value < 0
        or value > high
        or (value == high and not closed)
    ):
        bound = f"[0, {high}]" if closed else f"[0, {high})"
        raise MetarunError(
            f"{name} must be a number in {bound}; set e.g. augment.{key}={example}, or 0 for off"
        )
