"""Builders for test inputs: tars in img2dataset layout and images of every kind."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageDraw


def image_bytes(fmt: str = "JPEG", size=(40, 30), mode: str = "RGB", seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        arr = rng.integers(0, 65535, size[::-1], dtype=np.uint16)
        im = Image.fromarray(arr)
    else:
        arr = rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
        im = Image.fromarray(arr)
        if mode != "RGB":
            im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def photo_like(size=(640, 480), seed: int = 0) -> Image.Image:
    """An RGB image with a natural photo's 1/f spectrum plus hard-edged discs and lines: the
    fine detail and edges where resampling differences show (uniform noise exaggerates them)."""
    w, h = size
    rng = np.random.default_rng(seed)
    freq = np.hypot(np.fft.rfftfreq(w)[None, :], np.fft.fftfreq(h)[:, None])
    freq[0, 0] = 1.0
    planes = []
    for _ in range(3):
        spectrum = (rng.normal(size=freq.shape) + 1j * rng.normal(size=freq.shape)) / freq
        spectrum[0, 0] = 0.0
        planes.append(np.fft.irfft2(spectrum, s=(h, w)))
    x = np.stack(planes, -1) @ np.array([[1.0, 0.6, 0.3], [0.6, 1.0, 0.5], [0.3, 0.5, 1.0]])
    im = Image.fromarray(np.clip((x - x.mean()) / x.std() * 40 + 128, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    short = min(w, h)
    for _ in range(12):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(max(1, short // 20), max(2, short // 4))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        line = (*rng.integers(0, w, 1), *rng.integers(0, h, 1), *rng.integers(0, w, 1), *rng.integers(0, h, 1))
        draw.line([int(v) for v in line], fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=max(1, short // 200))
    return im


def encode(im: Image.Image, fmt: str = "JPEG", orientation: int | None = None, **save) -> bytes:
    """``im`` saved as ``fmt`` (JPEG: quality 90 unless given), with an EXIF orientation if asked."""
    if fmt == "JPEG":
        save.setdefault("quality", 90)
    if orientation is not None:
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        save["exif"] = exif.tobytes()
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def sample_files(key: str, identity: str | None, image: bytes | None = None, caption: str | None = None,
                 ext: str = "jpg") -> list[tuple[str, bytes]]:
    files = []
    if image is not None:
        files.append((f"{key}.{ext}", image))
    if identity is not None:
        files.append((f"{key}.json", json.dumps({"key": key, "identity": identity}).encode()))
    if caption is not None:
        files.append((f"{key}.txt", caption.encode()))
    return files


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path
