"""Builders for test inputs (tars in img2dataset layout, images of every kind, tiny jobs) and
the Ray executor's events, as tests watch them."""

from __future__ import annotations

import io
import json
import logging
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


def write_tiny_job(tmp_path: Path, tiny_model: dict, out: Path, shards: int = 2, per_shard: int = 120,
                   compute: str = "executor: ray, workers: 1, max_retries: 2",
                   attacks: str = "{idia: {top_k: 3}, encodermi: {views: 16}}") -> Path:
    """A job on the tiny model: ``shards`` tars of ``per_shard`` random images of 5 identities."""
    (tmp_path / "shards").mkdir(exist_ok=True)
    for s in range(shards):
        members = []
        for i in range(per_shard):
            members += sample_files(f"{s}{i:08d}", f"P{i % 5}", image_bytes(seed=s * 1000 + i, size=(64, 48)))
        write_tar(tmp_path / "shards" / f"{s:05d}.tar", members)
    (tmp_path / "names.txt").write_text("\n".join(f"P{i}" for i in range(8)) + "\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(f"""
model: {{name: {tiny_model['config']}, pretrained: {tiny_model['checkpoint']}, precision: fp32}}
data: {{shards: "shards/{{00000..{shards - 1:05d}}}.tar"}}
names: names.txt
attacks: {attacks}
compute: {{{compute}, batch_size: 4, decode_threads: 1}}
output: {out}
""")
    return spec


class MapEvents(logging.Handler):
    """Collects the Ray executor's structured log records (``record.map_event``: dispatch,
    timeout, broken, died) as (event, shard, actor pid) while installed::

        with MapEvents() as events: run_job(...)
    """

    LOGGER = "clipaudit.executors.ray"

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[tuple[str, str, int | None]] = []
        self._level = logging.NOTSET

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "map_event"):
            self.events.append((record.map_event, record.shard, record.actor_pid))

    def of(self, kind: str) -> list[tuple[str, int | None]]:
        return [(shard, pid) for k, shard, pid in list(self.events) if k == kind]

    def __enter__(self) -> "MapEvents":
        logger = logging.getLogger(self.LOGGER)
        self._level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self._level)

