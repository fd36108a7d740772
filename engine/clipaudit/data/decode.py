"""Robust image decoding: bytes → RGB uint8 array at model resolution, or an error code.

Handles what real scraped data contains: CMYK JPEGs, RGBA/LA/palette images with
transparency (composited on white), 16-bit grayscale PNGs (rescaled, not clipped),
animated images (first frame), EXIF rotation, truncated files (fail at ``load``), and
decompression bombs (refused from the header, before any pixel is allocated, by the
caller's ``max_pixels`` rather than Pillow's own limit).
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_PILLOW_LIMIT_LOCK = threading.Lock()


class DecodeFailure(Exception):
    """An image that cannot be used; ``code`` is the error column value."""

    def __init__(self, code: str, detail: str) -> None:
        detail = _ADDRESS.sub("<image bytes>", detail)  # keep outputs identical across runs
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8, size×size×3, resized (shortest side) and centre-cropped
    width: int  # original size
    height: int


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Shortest side to ``size`` (bicubic), then centre crop — OpenCLIP's eval transform."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _let_max_pixels_govern(max_pixels: int) -> None:
    """Raise Pillow's own limit so that it refuses no image of at most ``max_pixels`` pixels.

    ``Image.open`` raises ``DecompressionBombError`` above 2 × ``Image.MAX_IMAGE_PIXELS``
    (≈179 Mpx by default) before the header check in :func:`decode_image` could run, so a
    larger ``data.max_image_pixels`` would never take effect. ``MAX_IMAGE_PIXELS`` is one
    global read by every decode thread, so it is not set for one call and restored (another
    thread could read the restored value mid-decode); it is only ever raised, under a lock,
    to the largest limit asked for. After this call it allows at least this caller's limit
    whatever other decode threads do. Each call still refuses what exceeds its own ``max_pixels``
    by its own header check, and Pillow's checks of sizes that are not in the header (GIF
    frames, TIFF tiles) stay in place, at the raised limit.
    """
    needed = -(-max_pixels // 2)  # Pillow refuses above 2 × its limit, so this allows max_pixels
    current = Image.MAX_IMAGE_PIXELS
    if current is None or current >= needed:
        return
    with _PILLOW_LIMIT_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < needed:
            Image.MAX_IMAGE_PIXELS = needed


def decode_image(data: bytes, size: int, max_pixels: int) -> DecodedImage:
    """Decode, convert to RGB and resize one image; raise :class:`DecodeFailure`.

    Images whose header declares more than ``max_pixels`` pixels are refused as
    ``too_many_pixels`` before they are decoded.
    """
    if not data:
        raise DecodeFailure("decode_error", "zero-byte image file")
    _let_max_pixels_govern(max_pixels)
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecodeFailure("too_many_pixels", str(e)) from None
    except Exception as e:  # noqa: BLE001 — Pillow raises many types for bad bytes
        raise DecodeFailure("decode_error", f"not a readable image: {type(e).__name__}: {e}") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise DecodeFailure("decode_error", f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeFailure("too_many_pixels", f"{width}x{height} exceeds {max_pixels} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if getattr(im, "is_animated", False):
                im.seek(0)
            if im.format == "JPEG":
                im.draft("RGB", (size * 2, size * 2))  # DCT-domain downscale: much less work
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            im = resize_center_crop(im, size)
            pixels = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as e:
        raise DecodeFailure("too_many_pixels", str(e)) from None
    except Exception as e:  # noqa: BLE001
        raise DecodeFailure("decode_error", f"{type(e).__name__}: {e}") from None
    if pixels.shape != (size, size, 3):
        raise DecodeFailure("decode_error", f"unexpected decoded shape {pixels.shape}")
    return DecodedImage(pixels=pixels, width=width, height=height)
