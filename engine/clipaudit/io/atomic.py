"""Atomic, durable file writes: a temp name on the same file system, fsync, then a ``finish``
step — by default a rename into place and an fsync of the folder; an output's files are finished
by their store instead (:meth:`clipaudit.io.store.Store.publish`: the same rename, or one upload)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq


def temp_path(path: Path, tmp_dir: Path | None = None) -> Path:
    """A fresh temp name for ``path``: hidden beside it, or in ``tmp_dir`` (which must be on the
    same file system, so the final rename stays atomic)."""
    if tmp_dir is None:
        return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    return tmp_dir / f"{temp_prefix(path)}{uuid.uuid4().hex[:8]}"


def temp_prefix(path: Path) -> str:
    """How the name of a temp file for ``path`` in a ``_tmp/`` folder begins (folder + name)."""
    return f"{path.parent.name}.{path.name}.tmp-"


def fsync_file(path: Path) -> None:
    """Flush a written (and closed) file's bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` (already fsynced) to ``path`` and fsync the folder so the rename lasts."""
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the file itself is on disk
        pass
    finally:
        os.close(fd)


#: ``finish(finished_temp_file, final_path)``: puts a written, fsynced temp file in its place
Finish = Callable[[Path, Path], None]


def atomic_write_bytes(path: Path, data: bytes, tmp_dir: Path | None = None, finish: Finish = replace_durably) -> None:
    tmp = temp_path(path, tmp_dir)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    finish(tmp, path)


def atomic_write_json(path: Path, obj: Any, tmp_dir: Path | None = None, finish: Finish = replace_durably) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), tmp_dir,
                       finish)


def atomic_write_table(path: Path, table: pa.Table, tmp_dir: Path | None = None,
                       finish: Finish = replace_durably) -> None:
    tmp = temp_path(path, tmp_dir)
    pq.write_table(table, tmp, compression="zstd")
    fsync_file(tmp)
    finish(tmp, path)
