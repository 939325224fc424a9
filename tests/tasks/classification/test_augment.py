"""Batched per-sample augmentation: invariants of each operation and reproducibility from the generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modelworks.data import augment
from modelworks.data.augment import AugmentConfig, augment_batch

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
EVERYTHING = AugmentConfig(crop_padding=4, hflip=True, brightness=0.2, contrast=0.2, saturation=0.2,
                           rotation_deg=15, erasing_p=0.5)


def images(n: int = 32, channels: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_without_a_generator_only_normalises():
    x = images()
    out = augment_batch(x, EVERYTHING, MEAN, STD, None)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, (x.float() / 255 - MEAN) / STD, rtol=0, atol=1e-6)


def test_with_nothing_enabled_the_generator_changes_nothing():
    x = images()
    assert torch.equal(augment_batch(x, AugmentConfig(), MEAN, STD, generator()),
                       augment_batch(x, AugmentConfig(), MEAN, STD, None))


def test_input_is_not_modified():
    x = images()
    before = x.clone()
    augment_batch(x, EVERYTHING, MEAN, STD, generator())
    assert torch.equal(x, before)


def test_random_crop_with_zero_padding_is_identity():
    x = images()
    assert torch.equal(augment.random_crop(x, 0, generator()), x)


def test_random_crop_cuts_a_window_of_the_padded_image():
    x, padding = images(n=16), 2
    out = augment.random_crop(x, padding, generator())
    assert out.shape == x.shape
    padded = F.pad(x, (padding,) * 4)
    H, W = x.shape[-2:]
    offsets = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                   if torch.equal(out[i], padded[i, :, dy:dy + H, dx:dx + W])]
        assert matches, f"image {i} is not a crop of its padded input"
        offsets.add(matches[0])
    assert len(offsets) > 1  # each image draws its own offset


def test_hflip_flips_exactly_the_chosen_images():
    x = images(n=64)
    out = augment.random_hflip(x, generator())
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is exactly one of the two (random: never both)
    assert 10 < sum(flipped) < 54  # about half of them


def test_erasing_only_zeroes_a_rectangle():
    x = torch.randn(64, 3, 16, 16, generator=generator(5))  # normalised values: never exactly 0
    out = augment.random_erasing(x, 1.0, (0.02, 0.33), generator())
    for o, i in zip(out, x):
        changed = (o != i).any(0)  # H, W
        assert changed.any(), "p=1: every image is erased"
        assert torch.equal(changed, (o == 0).all(0))  # the changed pixels are zero in every channel
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert changed[top:bottom, left:right].all()  # the bounding box is filled: a rectangle
        area = (bottom - top) * (right - left) / (16 * 16)
        assert 0.0 < area <= 0.5


def test_erasing_with_zero_probability_is_identity():
    x = torch.randn(16, 3, 16, 16)
    assert torch.equal(augment.random_erasing(x, 0.0, (0.02, 0.33), generator()), x)


def test_zero_degree_rotation_is_identity():
    x = torch.rand(8, 3, 12, 12)
    torch.testing.assert_close(augment.random_rotation(x, 0.0, generator()), x, atol=1e-5, rtol=0)


def test_rotation_gives_each_image_its_own_angle():
    x = torch.zeros(8, 1, 12, 12)
    x[:, :, 2:4, :] = 1  # a horizontal band near the top: rotating it moves it
    out = augment.random_rotation(x, 90.0, generator())
    assert out.shape == x.shape
    angles = torch.rand(8, generator=generator()) * 180 - 90  # the draw the function makes
    change = (out - x).abs().amax(dim=(1, 2, 3))
    assert (change[angles.abs() > 10] > 0.5).all()
    assert (change[angles.abs() < 2] < 0.5).all()
    assert angles.abs().min() < 2 < 10 < angles.abs().max()  # this seed draws both kinds


def test_color_jitter_stays_in_range_and_brightness_scales_each_image():
    x = torch.rand(16, 3, 8, 8) * 0.5  # headroom so a factor up to 1.5 does not clip
    out = augment.color_jitter(x, 0.5, 0.0, 0.0, generator())
    assert out.min() >= 0 and out.max() <= 1
    factors = out.flatten(1) / x.flatten(1)
    assert torch.allclose(factors, factors[:, :1].expand_as(factors), atol=1e-4)  # one factor per image
    assert factors[:, 0].min() >= 0.5 - 1e-4 and factors[:, 0].max() <= 1.5 + 1e-4
    assert factors[:, 0].std() > 0.01


def test_same_seed_same_batch_other_seed_other_batch():
    x = images()
    a = augment_batch(x, EVERYTHING, MEAN, STD, generator(1))
    b = augment_batch(x, EVERYTHING, MEAN, STD, generator(1))
    c = augment_batch(x, EVERYTHING, MEAN, STD, generator(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_single_channel_batches_are_supported():
    x = images(channels=1, size=28)
    out = augment_batch(x, EVERYTHING, torch.tensor([0.286]).view(1, 1, 1, 1),
                        torch.tensor([0.353]).view(1, 1, 1, 1), generator())
    assert out.shape == x.shape and torch.isfinite(out).all()
