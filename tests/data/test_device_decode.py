"""JPEG decode + resize as tensor operations (the GPU path's code, run here on the CPU
decoder): which files go there, how close its pixels are to the Pillow path, and that a file
it cannot read falls back to Pillow with the same error code."""


import numpy as np
import pytest
import torch
from helpers import encode, photo_like

from clipaudit.data.decode import Preprocess, decode_image
from clipaudit.data.decode import device_eligible
from clipaudit.data.device_decode import decode_on_device

CPU = torch.device("cpu")
PRE = Preprocess(64)


def test_only_what_the_device_reads_like_pillow_is_eligible():
    photo = photo_like((200, 150))
    assert device_eligible(encode(photo), 10**8, PRE) == (200, 150)
    assert device_eligible(encode(photo.convert("L")), 10**8, PRE) == (200, 150)
    assert device_eligible(encode(photo, "PNG"), 10**8, PRE) is None
    assert device_eligible(encode(photo.convert("CMYK")), 10**8, PRE) is None
    assert device_eligible(encode(photo, progressive=True), 10**8, PRE) is None
    assert device_eligible(encode(photo, orientation=6), 10**8, PRE) is None  # EXIF rotation: Pillow's job
    assert device_eligible(encode(photo, orientation=1), 10**8, PRE) == (200, 150)
    assert device_eligible(encode(photo), 200 * 150 - 1, PRE) is None  # over max_pixels: Pillow names it
    assert device_eligible(encode(photo_like((40, 300))), 10**8, PRE) is None  # would be upsampled
    assert device_eligible(b"\xff\xd8 not really", 10**8, PRE) is None


@pytest.mark.parametrize("size", [(640, 480), (300, 500), (224, 224), (64, 64), (1000, 90)])
@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_device_pixels_match_the_pillow_path(size, mode, interpolation):
    pre = Preprocess(64, mode, interpolation)
    data = encode(photo_like(size, seed=1))
    if device_eligible(data, 10**8, pre) is None:
        pytest.skip("upsampled in this mode: goes to Pillow (tested above)")
    pillow = decode_image(data, pre, 10**8, source_side=96)
    (pixels, source), = decode_on_device([data], pre, CPU, source_side=96)
    diff = np.abs(pillow.pixels.astype(int) - pixels.numpy().astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.25, (diff.max(), diff.mean())  # one-level roundings at most
    assert source.shape == pillow.source.shape
    assert np.abs(pillow.source.astype(int) - source.numpy().astype(int)).mean() < 0.5


def test_a_file_the_device_cannot_decode_is_reported_for_the_pillow_fallback():
    good = encode(photo_like((200, 150)))
    broken = good[: len(good) // 3]  # a valid header, truncated data
    out = decode_on_device([good, broken, good], PRE, CPU)
    assert out[0] is not None and out[2] is not None
    torch.testing.assert_close(out[0][0], out[2][0])
    if out[1] is not None:  # libjpeg may pad a truncated file with grey: Pillow's path rejects it instead
        pytest.skip("this decoder accepts truncated JPEGs")


@pytest.mark.parametrize("mode", ["shortest", "longest"])
@pytest.mark.parametrize("budget", [None, 200 * 150 * 2])  # default, or chunks of two 200×150 images
def test_a_batch_of_mixed_sizes_is_resized_per_size_as_each_image_alone(mode, budget, monkeypatch):
    """Same-sized images are resized in one call (in chunks under a pixel budget): every image's
    pixels and bounded original are those it gets decoded alone."""
    from clipaudit.data import device_decode

    if budget is not None:
        monkeypatch.setattr(device_decode, "RESIZE_PIXELS", budget)
    pre = Preprocess(64, mode)
    sizes = [(200, 150), (300, 500), (200, 150), (640, 480), (300, 500), (200, 150)]
    datas = [encode(photo_like(size, seed=i)) for i, size in enumerate(sizes)]
    batch = decode_on_device(datas, pre, CPU, source_side=96)
    for data, (pixels, source) in zip(datas, batch):
        (alone, alone_source), = decode_on_device([data], pre, CPU, source_side=96)
        assert torch.equal(pixels, alone) and torch.equal(source, alone_source)
        assert pixels.shape == (64, 64, 3) and max(source.shape[:2]) == 96
