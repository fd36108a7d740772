"""Per-image random views on the device: independent per image, seeded per key."""

import numpy as np
import torch

from clipaudit.attacks.augment import (crop_resize, augmented_views, part_crops, patch_masks,
                                       random_resized_boxes, sample_rng)


def _images(n=4, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g)


def test_rng_depends_on_seed_key_and_stream_only():
    a = sample_rng(0, "k1", 5, "encodermi").random(3)
    assert np.array_equal(a, sample_rng(0, "k1", 99, "encodermi").random(3))  # position unused when key exists
    assert not np.array_equal(a, sample_rng(1, "k1", 5, "encodermi").random(3))
    assert not np.array_equal(a, sample_rng(0, "k2", 5, "encodermi").random(3))
    assert not np.array_equal(a, sample_rng(0, "k1", 5, "partcrop").random(3))


def test_boxes_respect_scale_and_bounds():
    rng = np.random.default_rng(0)
    b = random_resized_boxes(rng, 500, 48, (0.08, 0.2))
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / 48 ** 2
    assert b.min() >= 0 and b.max() <= 48
    assert area.min() >= 0.05 and area.max() <= 0.25


def test_full_box_crop_reproduces_a_smooth_image_and_half_box_zooms():
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(2, 3, 16, 16).contiguous()
    out = crop_resize(ramp, [np.array([[0, 0, 16, 16]], np.float32)] * 2, 16)
    torch.testing.assert_close(out[..., 1:-1], ramp[..., 1:-1], atol=1e-5, rtol=0)  # bilinear is exact on a ramp
    left = crop_resize(ramp, [np.array([[0, 0, 8, 16]], np.float32)] * 2, 16)
    assert left.max() <= ramp[..., :9].max() + 1e-6  # only the left half is seen


def test_each_image_gets_its_own_random_views():
    # the same picture four times in one batch: per-image parameters must make the views differ
    x = _images(1).repeat(4, 1, 1, 1)
    rngs = [sample_rng(0, f"k{i}", i, "encodermi") for i in range(4)]
    v = augmented_views(x, rngs, 3).view(4, 3, 3, 16, 16)
    assert v.min() >= 0 and v.max() <= 1
    for i in range(1, 4):
        assert not torch.allclose(v[0], v[i])
    crops = part_crops(x, [sample_rng(0, f"k{i}", i, "p") for i in range(4)], 5, (0.08, 0.2)).view(4, 5, 3, 16, 16)
    assert not torch.allclose(crops[0], crops[1])


def test_views_do_not_depend_on_batch_composition():
    x = _images(4)
    keys = ["a", "b", "c", "d"]
    together = augmented_views(x, [sample_rng(3, k, 0, "e") for k in keys], 4).view(4, 4, 3, 16, 16)
    alone = augmented_views(x[2:3], [sample_rng(3, "c", 0, "e")], 4).view(1, 4, 3, 16, 16)
    torch.testing.assert_close(together[2], alone[0], atol=1e-6, rtol=0)


def test_patch_masks_hide_the_requested_fraction_per_image():
    rngs = [sample_rng(0, f"k{i}", i, "mim") for i in range(3)]
    m = patch_masks(rngs, [0.25, 0.75], grid=4, size=16, device=torch.device("cpu")).view(3, 2, 16, 16)
    hidden = 1 - m.mean(dim=(2, 3))
    torch.testing.assert_close(hidden, torch.tensor([[0.25, 0.75]] * 3))
    assert not torch.equal(m[0, 0], m[1, 0])
