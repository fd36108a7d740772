import io

import numpy as np
import pytest
from helpers import image_bytes
from PIL import Image

from clipaudit.data.decode import DecodeFailure, decode_image

SIZE = 32
LIMIT = 10_000_000


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fmt="JPEG"), dict(fmt="PNG"), dict(fmt="WEBP"), dict(fmt="JPEG", mode="CMYK"),
        dict(fmt="PNG", mode="RGBA"), dict(fmt="PNG", mode="P"), dict(fmt="PNG", mode="L"),
        dict(fmt="PNG", mode="LA"), dict(fmt="PNG", mode="I;16"), dict(fmt="GIF", mode="P"),
        dict(fmt="JPEG", size=(600, 20)), dict(fmt="PNG", size=(3, 5)),
    ],
)
def test_valid_images_decode_to_rgb_model_size(kwargs):
    img = decode_image(image_bytes(**kwargs), SIZE, LIMIT)
    assert img.pixels.shape == (SIZE, SIZE, 3) and img.pixels.dtype == np.uint8


def test_16bit_grayscale_is_rescaled_not_clipped():
    arr = np.full((20, 20), 32768, dtype=np.uint16)  # mid-grey in 16 bit
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    px = decode_image(buf.getvalue(), SIZE, LIMIT).pixels
    assert 120 <= px.mean() <= 135


def test_transparent_pixels_become_white():
    buf = io.BytesIO()
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(buf, "PNG")
    assert decode_image(buf.getvalue(), SIZE, LIMIT).pixels.min() == 255


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    px = decode_image(buf.getvalue(), SIZE, LIMIT).pixels
    assert px[..., 0].mean() > 200 and px[..., 2].mean() < 50


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", "decode_error"),
        (b"\xff\xd8\xff\xe0garbage" * 10, "decode_error"),
        (image_bytes("JPEG", size=(200, 200))[:600], "decode_error"),  # truncated: fails at load()
    ],
)
def test_bad_bytes_fail_with_code(data, code):
    with pytest.raises(DecodeFailure) as e:
        decode_image(data, SIZE, LIMIT)
    assert e.value.code == code


def test_decompression_bomb_refused_from_header():
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")  # 400 Mpx, a few kB on disk
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(DecodeFailure) as e:
        decode_image(buf.getvalue(), SIZE, max_pixels=50_000_000)
    assert e.value.code == "too_many_pixels"


def test_max_pixels_below_pillows_limit_is_the_engines_check():
    buf = io.BytesIO()
    Image.new("1", (2000, 1000)).save(buf, "PNG")  # 2 Mpx: far below Pillow's own limit
    with pytest.raises(DecodeFailure) as e:
        decode_image(buf.getvalue(), SIZE, max_pixels=1_000_000)
    assert e.value.code == "too_many_pixels" and e.value.detail == "2000x1000 exceeds 1000000 pixels"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_max_pixels_above_pillows_limit_takes_effect(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    w, h = 15000, 13000  # 195 Mpx: over Pillow's 2 × MAX_IMAGE_PIXELS (≈179 Mpx), which refuses it by itself
    assert w * h > 2 * Image.MAX_IMAGE_PIXELS
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, "JPEG")  # ~2 MB; decoded at 1/8 scale (draft), well under a second
    img = decode_image(buf.getvalue(), SIZE, max_pixels=200_000_000)
    assert (img.width, img.height) == (w, h) and img.pixels.shape == (SIZE, SIZE, 3)
    with pytest.raises(DecodeFailure) as e:  # a smaller limit still refuses it, Pillow's raised one or not
        decode_image(buf.getvalue(), SIZE, max_pixels=100_000_000)
    assert e.value.code == "too_many_pixels" and e.value.detail == f"{w}x{h} exceeds 100000000 pixels"
