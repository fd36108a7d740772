"""The output folder: layout, atomic writes and per-shard markers, on a local folder or an
output URL (:mod:`clipaudit.io.store`).

A shard is done when its Parquet part(s) exist *and* its marker ``_markers/<part>.done.json``
(written last) agrees with the part's row count. Anything else means "redo". Every file is
written to a temp file under ``_tmp/`` (local, even for an output URL) and published whole
(:meth:`.store.Store.publish`: renamed into place, or one upload), so a marker never reaches the
output before the part it vouches for. The data folders (``samples/``, ``embeddings/``,
``sample_scores/``) hold finished parts only, so any Parquet reader may glob them as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from clipaudit.core.errors import ClipauditError
from clipaudit.data.urls import is_url
from clipaudit.io.atomic import (atomic_write_bytes, atomic_write_json, atomic_write_table, fsync_file,
                                 replace_durably, temp_path, temp_prefix)
from clipaudit.io.store import Store

log = logging.getLogger(__name__)

def part_name(shard: str) -> str:
    """A stable, file-system-safe part name for a shard path."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(shard).name.split(".")[0])[:40] or "shard"
    return f"{stem}-{hashlib.sha1(shard.encode()).hexdigest()[:10]}"


class PartWriter:
    """Streams record batches into a temp Parquet file (in ``tmp_dir`` when given, else hidden
    beside ``path``); ``commit`` renames it to ``path``."""

    def __init__(self, path: Path, schema: pa.Schema, tmp_dir: Path | None = None) -> None:
        self.path = path
        self.schema = schema
        self.rows = 0
        self.bytes: int | None = None  # known once committed
        self._tmp = temp_path(path, tmp_dir)
        self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd")

    def write(self, columns: dict[str, list]) -> None:
        batch = pa.RecordBatch.from_pydict(columns, schema=self.schema)
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def commit(self, store: Store | None = None) -> None:
        """Close, fsync and publish the part (renamed into place, or through ``store``): once this
        returns, its bytes are on the disk or the store."""
        self._writer.close()
        fsync_file(self._tmp)
        self.bytes = self._tmp.stat().st_size
        if store is None:
            replace_durably(self._tmp, self.path)
        else:
            store.publish(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class OutputLayout:
    """Where everything lives under the job's output folder. ``store`` does the reads and writes
    (:mod:`.store`); for an output URL, ``root`` is a local scratch folder that stands for it."""

    root: Path
    store: Store = field(default=None, compare=False)  # type: ignore[assignment]  # default: the folder

    def __post_init__(self) -> None:
        if self.store is None:
            object.__setattr__(self, "store", Store.local(self.root))

    @property
    def where(self) -> str:
        """The output as users name it: its folder or URL."""
        return self.store.where

    def write_bytes(self, path: Path, data: bytes) -> None:
        """Write a whole file: a temp file under ``_tmp/``, fsynced, then published by the store."""
        atomic_write_bytes(path, data, self.tmp_dir, self.store.publish)

    def write_json(self, path: Path, obj: Any) -> None:
        atomic_write_json(path, obj, self.tmp_dir, self.store.publish)

    def write_table(self, path: Path, table: pa.Table) -> None:
        atomic_write_table(path, table, self.tmp_dir, self.store.publish)

    def read_json(self, path: Path) -> Any | None:
        return self.store.read_json(path)

    def unpublish(self, *paths: Path) -> None:
        """Remove these files (best effort, in this order): parts a shard wrote before a later step
        of it failed, so that no part is left without its marker."""
        self.store.remove(*paths, quiet=True)

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    @property
    def sample_scores_dir(self) -> Path:
        return self.root / "sample_scores"

    @property
    def downloads_dir(self) -> Path:
        return self.root / "downloads"

    @property
    def state_dir(self) -> Path:
        """Per-job attack state (the name pool's text embeddings) by key, unless
        ``compute.state_dir`` puts it elsewhere (see :mod:`clipaudit.map.state`)."""
        return self.root / "_state"

    @property
    def markers_dir(self) -> Path:
        """Per-shard markers, outside the data folders so a glob over those sees parts only."""
        return self.root / "_markers"

    @property
    def tmp_dir(self) -> Path:
        """Files being written (then renamed into place); on the output folder's file system."""
        return self.root / "_tmp"

    identities = property(lambda self: self.root / "identities.parquet")
    metrics = property(lambda self: self.root / "metrics.json")
    roc = property(lambda self: self.root / "roc.parquet")
    calibration = property(lambda self: self.root / "calibration.json")
    manifest = property(lambda self: self.root / "manifest.json")
    summary = property(lambda self: self.root / "_SUMMARY.json")
    #: what the last reduce step was computed from (see :func:`clipaudit.reduce.pipeline.reduce_inputs`)
    reduce_state = property(lambda self: self.root / "_REDUCE.json")
    job_state = property(lambda self: self.root / "_job.json")
    attackers_dir = property(lambda self: self.root / "attackers")

    def make_dirs(self) -> None:
        """The local folders writers need (for an output URL only the scratch ones)."""
        local = (self.tmp_dir,)
        for d in local if self.store.remote else (self.samples_dir, self.embeddings_dir, self.markers_dir) + local:
            d.mkdir(parents=True, exist_ok=True)

    def sample_part(self, shard: str) -> Path:
        return self.samples_dir / f"{part_name(shard)}.parquet"

    def embedding_part(self, shard: str) -> Path:
        return self.embeddings_dir / f"{part_name(shard)}.parquet"

    def download_part(self, shard: str) -> Path:
        return self.downloads_dir / f"{part_name(shard)}.parquet"

    def marker(self, shard: str) -> Path:
        return self.markers_dir / f"{part_name(shard)}.done.json"

    def read_marker(self, shard: str) -> dict[str, Any] | None:
        try:
            return self.store.read_json(self.marker(shard))
        except OSError:
            return None

    def _rows(self, part: Path) -> int | None:
        try:
            with self.store.open(part) as f:
                return pq.ParquetFile(f).metadata.num_rows
        except (OSError, pa.ArrowException):
            return None

    def is_done(self, shard: str) -> bool:
        """The marker exists and vouches for the parts there (see :meth:`finished`)."""
        return shard in self.finished([shard])

    def finished(self, shards: list[str]) -> dict[str, dict[str, Any]]:
        """The markers of the shards of ``shards`` that are done, from one listing of the markers
        and parts and one read of the markers found. A shard is done when its marker names it and
        its parts are there with the sizes the marker records (every part is published whole, so a
        part of that size is the one it vouches for); an older marker without sizes has its parts'
        row counts read instead. Anything else means "redo"."""
        store = self.store
        listed = {**store.files(self.markers_dir), **store.files(self.samples_dir), **store.files(self.embeddings_dir)}
        wanted = {self.marker(s): s for s in shards}
        found = store.read_many([p for p in wanted if p in listed])
        out: dict[str, dict[str, Any]] = {}
        for path, raw in found.items():
            shard = wanted[path]
            try:
                marker = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(marker, dict) or marker.get("shard") != shard:
                continue
            parts = [(self.sample_part(shard), "rows", "bytes")]
            if marker.get("embedding_rows") is not None:
                parts.append((self.embedding_part(shard), "embedding_rows", "embedding_bytes"))
            if all(p in listed and (listed[p] == marker[size] if marker.get(size) is not None
                                    else self._rows(p) == marker.get(rows)) for p, rows, size in parts):
                out[shard] = marker
        return out

    def has_map_results(self) -> bool:
        """Any sample part or marker: results an earlier run committed (temp files do not count)."""
        return bool(self.store.glob(self.samples_dir) or self.store.glob(self.markers_dir, ".done.json"))

    def temp_files(self, path: Path) -> list[Path]:
        """The temp files now being written for ``path`` (in ``_tmp/``)."""
        d = self.tmp_dir
        return [p for p in d.iterdir() if p.name.startswith(temp_prefix(path))] if d.is_dir() else []

    def remove_stale_temps(self) -> int:
        """Delete temp files left by killed writers (everything in ``_tmp/``, and the hidden
        ones older versions left beside their targets); only safe while holding :meth:`lock`."""
        n = 0
        if self.tmp_dir.is_dir():
            for p in self.tmp_dir.iterdir():
                if p.is_dir():  # a killed reduce step's DuckDB spill or near-duplicate partitions
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                n += 1
        states = [d for d in self.state_dir.iterdir() if d.is_dir()] if self.state_dir.is_dir() else []
        for d in (self.root, self.samples_dir, self.embeddings_dir, self.sample_scores_dir,
                  self.markers_dir, self.attackers_dir, self.downloads_dir, *states):
            for p in d.glob(".*.tmp-*") if d.is_dir() else ():
                p.unlink(missing_ok=True)
                n += 1
        return n

    def lock(self) -> OutputLock:
        """The output's lock on this machine (for an output URL it covers this machine only: see
        :meth:`.store.Store.warn_single_writer`)."""
        return OutputLock(self.root / ".clipaudit.lock")

    def clear_map_outputs(self) -> None:
        """Remove everything the map step wrote (for ``--force``): markers first, so no marker is
        ever left vouching for a removed part. The attack state stays: it is kept by a key of
        everything it depends on, so it is never stale."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # local, even for an output URL
        for d in (self.markers_dir, self.samples_dir, self.embeddings_dir, self.sample_scores_dir, self.downloads_dir):
            self.store.remove_tree(d)
        self.store.remove(self.identities, self.metrics, self.roc, self.calibration, self.summary, self.job_state,
                          self.reduce_state)


def output_layout(output: Path | str, storage_options: Mapping[str, Any] | None = None) -> OutputLayout:
    """The layout of a local output folder, or of an output URL (s3://, gs://, …) read and written
    on its store (nothing is contacted here)."""
    if isinstance(output, str) and is_url(output):
        store = Store.for_url(output, storage_options)
        return OutputLayout(store.base, store)
    return OutputLayout(Path(str(output).removeprefix("file://")))


#: the output's files by role as paths relative to its root (for reading an output elsewhere than
#: on this machine's disk, e.g. on a store)
RELATIVE = OutputLayout(Path())


class OutputBusy(ClipauditError, RuntimeError):
    """Another clipaudit process is writing to the same output folder."""


class OutputLock:
    """An exclusive advisory lock (``flock``) on the output folder for one run or reduce.

    The kernel drops it when the holder dies, so a killed driver never leaves it behind.
    File systems without ``flock`` support get a warning and no lock.
    """

    def __init__(self, path: Path) -> None:
        self.path, self._fd = path, None

    @property
    def held(self) -> bool:
        """False where the file system refused ``flock`` (then another run may be writing)."""
        return self._fd is not None

    def __enter__(self) -> OutputLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusy(f"{self.path.parent} is being written by another clipaudit process ({holder}); "
                             "wait for it to finish or choose another output folder") from None
        except OSError as e:  # e.g. a network file system without flock
            log.warning("cannot lock %s (%s); make sure no other run writes there", self.path, e)
            os.close(fd)
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def no_audit(root, missing: str) -> str:
    """The one wording for a folder that holds no (finished) audit."""
    return f"{root} is not a clipaudit output folder (no {missing}): run `clipaudit run JOB.yaml` first"
