"""Builders for test inputs: tars in img2dataset layout and images of every kind."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


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
