"""Per-image augmentation: each op against its exact definition, reproducibility from the generator
alone, and config errors. Small random images keep every test fast."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from metarun.data.augment import Augment
from metarun.errors import MetarunError

NATURAL = dict(crop_padding=4, flip=True, color_jitter=0.4)
OMNIGLOT = dict(rotate=10.0, translate=0.1, scale=0.1)
EVERYTHING = dict(**NATURAL, **OMNIGLOT)


def images(n: int = 16, channels: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    """[n, C, size, size] float in [0, 1]; distinct images, with no pixel at 0 or 1."""
    return 0.05 + 0.9 * torch.rand(
        n, channels, size, size, generator=torch.Generator().manual_seed(seed)
    )


def augment(**settings) -> Augment:
    return Augment(**settings).resolve({})


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shifted(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """image [C, H, W] moved dx pixels right and dy down: torch.roll with the wrapped pixels zeroed."""
    H, W = image.shape[-2:]
    rows, cols = torch.arange(H), torch.arange(W)
    came_in = ((rows - dy < 0) | (rows - dy >= H))[:, None] | ((cols - dx < 0) | (cols - dx >= W))[
        None, :
    ]
    return torch.roll(image, shifts=(dy, dx), dims=(-2, -1)).masked_fill(came_in, 0)


@pytest.mark.parametrize("settings", [NATURAL, OMNIGLOT], ids=["natural", "omniglot"])
def test_identical_images_in_one_batch_each_get_their_own_augmentation(settings):
    x = images(n=1).expand(16, -1, -1, -1).contiguous()  # one image 16 times
    out = augment(**settings)(x, seeded(0))
    assert not torch.equal(out, x)
    distinct = {tuple(image.flatten().tolist()) for image in out}
    assert len(distinct) == 16


@pytest.mark.parametrize("channels", [1, 3])
def test_output_keeps_shape_dtype_and_unit_range(channels):
    x = images(channels=channels, size=10)
    out = augment(**{**EVERYTHING, "color_jitter": 1.0})(x, seeded(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_same_seed_gives_bit_identical_output_and_another_seed_differs():
    x, aug = images(), augment(**EVERYTHING)
    assert torch.equal(aug(x, seeded(7)), aug(x, seeded(7)))
    assert not torch.equal(aug(x, seeded(7)), aug(x, seeded(8)))


def test_augmenting_leaves_the_global_rng_untouched():
    before = torch.get_rng_state()
    augment(**EVERYTHING)(images(), seeded(0))
    assert torch.equal(torch.get_rng_state(), before)


def test_draw_returns_only_the_ops_that_are_on_with_one_value_per_image():
    assert set(augment(crop_padding=2).draw(5, seeded(0))) == {"shift"}
    params = augment(**EVERYTHING).draw(5, seeded(0))
    assert set(params) == {
        "shift",
        "flip",
        "angle",
        "translate",
        "scale",
        "brightness",
        "contrast",
        "saturation",
    }
    assert all(len(value) == 5 for value in params.values())


def test_crop_padding_alone_shifts_each_image_by_its_drawn_integers_with_zero_fill():
    x, aug = images(n=64), augment(crop_padding=3)
    params = aug.draw(64, seeded(0))
    out = aug.apply(x, params)
    shifts = params["shift"]  # [n, (x, y)]
    assert shifts.dtype == torch.int64 and shifts.min() == -3 and shifts.max() == 3
    for image, result, (dx, dy) in zip(x, out, shifts.tolist()):
        assert torch.equal(result, shifted(image, dx, dy)), (dx, dy)


def test_flip_alone_mirrors_exactly_the_drawn_images():
    x, aug = images(n=32), augment(flip=True)
    params = aug.draw(32, seeded(0))
    flipped = params["flip"]
    assert 0 < int(flipped.sum()) < 32
    expected = torch.where(flipped[:, None, None, None], torch.flip(x, dims=[-1]), x)
    assert torch.equal(aug.apply(x, params), expected)


def test_rotate_by_90_degrees_turns_images_counter_clockwise():
    x, aug = images(n=2, channels=1, size=5), augment(rotate=90.0)
    out = aug.apply(x, {"angle": torch.tensor([90.0, -90.0])})
    torch.testing.assert_close(out[0], torch.rot90(x[0], 1, dims=(1, 2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], torch.rot90(x[1], -1, dims=(1, 2)), atol=1e-5, rtol=0)


def test_zero_color_jitter_with_everything_else_off_returns_the_input_itself():
    aug, x = augment(color_jitter=0.0), images()
    assert not aug.active
    assert aug(x, seeded(0)) is x


def test_unit_jitter_factors_leave_images_unchanged():
    x, ones = images(n=4), torch.ones(4)
    out = augment(color_jitter=0.5).apply(
        x, {"brightness": ones, "contrast": ones, "saturation": ones}
    )
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


def test_brightness_factor_scales_one_image_as_computed_by_hand():
    x = images(n=1)
    ones = torch.ones(1)
    out = augment(color_jitter=0.5).apply(
        x, {"brightness": torch.tensor([1.3]), "contrast": ones, "saturation": ones}
    )
    torch.testing.assert_close(out[0], (x[0] * 1.3).clamp(0, 1), atol=1e-6, rtol=0)
    assert out.max() == 1  # brightened pixels past 1 are clamped


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_matches_torchvision_functional_with_each_images_factors(channels):
    x, aug = images(n=6, channels=channels), augment(color_jitter=0.8)
    params = aug.draw(6, seeded(0))
    low, high = 0.2, 1.8
    assert all(
        low <= float(params[key].min()) and float(params[key].max()) <= high
        for key in ("brightness", "contrast", "saturation")
    )
    out = aug.apply(x, params)
    for i in range(6):
        expected = F.adjust_brightness(x[i], float(params["brightness"][i]))
        expected = F.adjust_contrast(expected, float(params["contrast"][i]))
        expected = F.adjust_saturation(expected, float(params["saturation"][i]))
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)


def test_draw_on_a_cpu_generator_then_apply_equals_call_with_the_same_seed():
    x, aug = images(), augment(**EVERYTHING)
    assert torch.equal(aug.apply(x, aug.draw(len(x), seeded(3))), aug(x, seeded(3)))


@pytest.mark.cuda
def test_cpu_drawn_parameters_apply_alike_on_cuda_and_a_cuda_generator_draws_on_cuda():
    x, aug = images(), augment(**EVERYTHING)
    params = aug.draw(len(x), seeded(0))
    torch.testing.assert_close(
        aug.apply(x.cuda(), params).cpu(), aug.apply(x, params), atol=1e-5, rtol=0
    )
    crop = augment(crop_padding=3, flip=True)
    params = crop.draw(len(x), seeded(0))
    assert torch.equal(crop.apply(x.cuda(), params).cpu(), crop.apply(x, params))
    generator = torch.Generator("cuda").manual_seed(0)
    assert all(value.is_cuda for value in aug.draw(4, generator).values())
    assert torch.equal(
        aug(x.cuda(), torch.Generator("cuda").manual_seed(1)),
        aug(x.cuda(), torch.Generator("cuda").manual_seed(1)),
    )


def test_resolve_fills_unset_settings_from_the_standard_and_keeps_explicit_ones():
    standard = dict(crop_padding=4, flip=True, color_jitter=0.4)
    resolved = Augment(query=True, flip=False, rotate=5.0).resolve(standard)
    assert (resolved.crop_padding, resolved.flip, resolved.color_jitter) == (4, False, 0.4)
    assert (resolved.rotate, resolved.translate, resolved.scale) == (5.0, 0.0, 0.0)
    assert (resolved.support, resolved.query) == (True, True)


def test_resolve_turns_off_what_neither_the_config_nor_the_standard_sets():
    resolved = Augment().resolve({})
    assert resolved.settings() == dict(
        crop_padding=0,
        flip=False,
        color_jitter=0.0,
        rotate=0.0,
        translate=0.0,
        scale=0.0,
        resized_crop=0.0,
    )
    assert not resolved.active


def test_resolve_rejects_unknown_standard_keys():
    with pytest.raises(ValueError, match="hue"):
        Augment().resolve({"hue": 0.1})


@pytest.mark.parametrize(
    "key, value",
    [
        ("crop_padding", -1),
        ("crop_padding", 2.5),
        ("flip", "yes"),
        ("color_jitter", 1.5),
        ("color_jitter", -0.1),
        ("rotate", -5),
        ("translate", 2.0),
        ("scale", 1.0),
        ("support", 1),
    ],
)
def test_invalid_settings_are_one_line_errors_naming_the_config_key(key, value):
    with pytest.raises(MetarunError) as error:
        Augment(**{key: value})
    message = str(error.value)
    assert message.startswith(f"augment.{key}={value} must be") and "\n" not in message


def test_invalid_standard_values_are_rejected_when_resolved():
    with pytest.raises(MetarunError, match="augment.scale=1.5"):
        Augment().resolve({"scale": 1.5})


def test_resized_crop_equals_torchvision_resized_crop_inside_the_box():
    x, aug = images(n=1, channels=3, size=12), augment(resized_crop=0.08)
    # A 6 x 4 box at left 2, top 3 of a 12 x 12 image, in the normalized units Augment draws.
    size = torch.tensor([[6 / 12, 4 / 12]])
    centre = torch.tensor([[2 * 2 / 12 - 1 + 6 / 12, 2 * 3 / 12 - 1 + 4 / 12]])
    out = aug.apply(x, {"crop_size": size, "crop_centre": centre})
    expected = F.resized_crop(x, 3, 2, 4, 6, [12, 12], antialias=False)
    # torchvision crops, then resizes: at the box's edge it repeats the edge where this reads on.
    torch.testing.assert_close(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_resized_crops_keep_their_area_and_ratio_ranges_and_stay_inside():
    params = augment(resized_crop=0.25).draw(4000, seeded(0))
    w, h = params["crop_size"].unbind(-1)
    assert bool(((w * h >= 0.25 - 1e-6) | (w == 1) | (h == 1)).all())
    ratio = w / h
    inside = (ratio >= 3 / 4 - 1e-6) & (ratio <= 4 / 3 + 1e-6)
    assert bool((inside | (w == 1) | (h == 1)).all())
    assert bool((params["crop_centre"].abs() <= 1 - params["crop_size"] + 1e-6).all())
    assert 0.5 < float((w * h).mean()) < 0.7  # uniform area in [0.25, 1], cut at the side
