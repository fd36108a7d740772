"""Robust image decoding: bytes → RGB uint8 array at model resolution, or an error code.

The resize follows the model's preprocessing (:class:`Preprocess`), as OpenCLIP's eval
transform does: shortest side + centre crop, longest side + pad, or squash, bicubic or bilinear.

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


RESIZE_MODES = ("shortest", "longest", "squash")
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's ``size``×``size`` input (OpenCLIP's eval transform).

    ``resize_mode``: ``shortest`` (shortest side to ``size``, centre crop), ``longest``
    (longest side to ``size``, centred on a ``fill`` background) or ``squash`` (both sides to
    ``size``). ``interpolation``: ``bicubic`` or ``bilinear``.
    """

    size: int
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill: int | tuple[int, int, int] = 0

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {tuple(_RESAMPLE)}")

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize, before the crop or pad — rounded as OpenCLIP rounds."""
        s = self.size
        if self.resize_mode == "squash":
            return s, s
        if self.resize_mode == "longest":
            ratio = max(width, height) / s
            return max(1, round(width / ratio)), max(1, round(height / ratio))
        long_side = int(s * max(width, height) / min(width, height))  # truncated, as torchvision's Resize
        return (s, long_side) if width <= height else (long_side, s)

    def apply(self, im: Image.Image) -> Image.Image:
        """Resize the RGB image ``im`` and crop or pad it to ``size``×``size``."""
        nw, nh = self.resized_size(*im.size)
        if (nw, nh) != im.size:
            im = im.resize((nw, nh), _RESAMPLE[self.interpolation])
        s = self.size
        if self.resize_mode == "longest":
            # Pillow reads an int as packed RGB
            fill = (self.fill,) * 3 if isinstance(self.fill, int) else tuple(self.fill)
            canvas = Image.new("RGB", (s, s), fill)
            canvas.paste(im, ((s - nw) // 2, (s - nh) // 2))
            return canvas
        left, top = round((nw - s) / 2), round((nh - s) / 2)  # Python rounding, as torchvision's CenterCrop
        return im.crop((left, top, left + s, top + s))


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8, size×size×3, resized and cropped or padded per Preprocess
    width: int  # original size
    height: int
    #: uint8 h×w×3: the whole original (RGB, EXIF-rotated), shrunk so its longest side is at
    #: most ``source_side`` and never enlarged; None unless asked for
    source: np.ndarray | None = None


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


def shrink_to(im: Image.Image, side: int, interpolation: str = "bicubic") -> Image.Image:
    """``im`` with its longest side at most ``side`` (aspect kept, never enlarged)."""
    longest = max(im.size)
    if longest <= side:
        return im
    w, h = im.size
    return im.resize((max(1, round(w * side / longest)), max(1, round(h * side / longest))), _RESAMPLE[interpolation])


def decode_image(data: bytes, size: int | Preprocess, max_pixels: int, source_side: int | None = None) -> DecodedImage:
    """Decode, convert to RGB and resize one image; raise :class:`DecodeFailure`.

    ``size`` is the model's :class:`Preprocess` (an int: shortest side + centre crop,
    bicubic). Images whose header declares more than ``max_pixels`` pixels are refused as
    ``too_many_pixels`` before they are decoded. With ``source_side``, the whole original is
    kept too (see :attr:`DecodedImage.source`), for views cut from the original image.
    """
    pre = size if isinstance(size, Preprocess) else Preprocess(size)
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
            # No JPEG draft mode (decoding at 1/2 to 1/8 scale in the DCT): its pixels are not a
            # full decode's. Against OpenCLIP's eval transform, on 1/f-noise test photos with hard
            # edges, it was off by up to 19 uint8 levels where the reduced image was 2× the
            # resized size (the old rule), and still by 3 at 16× and at 23×: no ratio tried kept
            # it within the one level tests/data/test_decode.py allows. A full decode of an RGB
            # image matches exactly; it costs more on large JPEGs (12 Mpx: ~115 ms, was ~45 ms),
            # and data.max_image_pixels bounds that.
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            source = None if source_side is None else np.asarray(shrink_to(im, source_side, pre.interpolation),
                                                                 dtype=np.uint8)
            im = pre.apply(im)
            pixels = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as e:
        raise DecodeFailure("too_many_pixels", str(e)) from None
    except Exception as e:  # noqa: BLE001
        raise DecodeFailure("decode_error", f"{type(e).__name__}: {e}") from None
    if pixels.shape != (pre.size, pre.size, 3):
        raise DecodeFailure("decode_error", f"unexpected decoded shape {pixels.shape}")
    return DecodedImage(pixels=pixels, width=width, height=height, source=source)


#: the EXIF tag of the orientation: a rotated JPEG goes the Pillow way
_EXIF_ORIENTATION = 0x0112


def device_eligible(data: bytes, max_pixels: int, pre: Preprocess) -> tuple[int, int] | None:
    """The image's (width, height) when the header says the device path reads and resizes
    this file as Pillow would, else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))  # header only
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
            if im.info.get("progressive") or im.info.get("progression"):
                return None
            w, h = im.size
            if w <= 0 or h <= 0 or w * h > max_pixels:
                return None
            nw, nh = pre.resized_size(w, h)
            if nw > w or nh > h:  # an upsampling: Pillow's kernel, not torch's
                return None
            return (w, h) if im.getexif().get(_EXIF_ORIENTATION, 1) == 1 else None
    except Exception:  # noqa: BLE001 — anything odd goes the Pillow way, which names the error
        return None
