"""The output folder: layout, versioned schemas, atomic writes and per-shard markers.

A shard is done when its Parquet part(s) exist *and* its marker ``_markers/<part>.done.json``
(written last) agrees with the part's row count. Anything else means "redo". Every file
is written to a temp name (under ``_tmp/`` for the output folder's files), fsynced, renamed
into place, and the destination folder fsynced, so a marker never reaches the disk before the
bytes of the part it vouches for. The data folders (``samples/``, ``embeddings/``,
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
from clipaudit.io.atomic import Publish, fsync_file, publish_then_replace, temp_path, temp_prefix
from clipaudit.io.remote_output import RemoteOutput

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
        self._tmp = temp_path(path, tmp_dir)
        self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd")

    def write(self, columns: dict[str, list]) -> None:
        batch = pa.RecordBatch.from_pydict(columns, schema=self.schema)
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def commit(self, publish: Publish | None = None) -> None:
        """Close, fsync, publish (see :data:`Publish`) and rename the part: once this returns, its
        bytes are on the disk (and on the store)."""
        self._writer.close()
        fsync_file(self._tmp)
        publish_then_replace(self._tmp, self.path, publish)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class OutputLayout:
    """Where everything lives under the job's output folder. For an output on object storage,
    ``root`` is its local mirror and ``remote`` the store (see :mod:`.remote_output`)."""

    root: Path
    remote: RemoteOutput | None = field(default=None, compare=False)

    def publisher(self) -> Publish | None:
        """On object storage: the function that PUTs a finished temp file where its final path
        stands on the store (before the file is renamed into the mirror); None for a local folder."""
        return None if self.remote is None else self.remote.put

    def unpublish(self, *paths: Path) -> None:
        """Remove these files, here and (best effort) on the store: parts a shard wrote before a
        later step of it failed, so that no part is left without its marker."""
        for p in paths:
            p.unlink(missing_ok=True)
        if self.remote is not None:
            self.remote.remove_quietly(*paths)

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
    def cache_dir(self) -> Path:
        return self.root / "_cache"

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
        for d in (self.samples_dir, self.embeddings_dir, self.cache_dir, self.markers_dir, self.tmp_dir):
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
            return json.loads(self.marker(shard).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def is_done(self, shard: str) -> bool:
        """The marker exists and the part it vouches for has exactly its row count."""
        marker = self.read_marker(shard)
        if marker is None or marker.get("shard") != shard:
            return False
        try:
            rows = pq.ParquetFile(self.sample_part(shard)).metadata.num_rows
        except (OSError, pa.ArrowException):
            return False
        if rows != marker.get("rows"):
            return False
        if marker.get("embedding_rows") is not None:
            try:
                emb_rows = pq.ParquetFile(self.embedding_part(shard)).metadata.num_rows
            except (OSError, pa.ArrowException):
                return False
            return emb_rows == marker["embedding_rows"]
        return True

    def has_map_results(self) -> bool:
        """Any sample part or marker: results an earlier run committed (temp files do not count)."""
        d, m = self.samples_dir, self.markers_dir
        return ((d.is_dir() and (any(d.glob("*.parquet")) or any(d.glob("_*.done.json"))))
                or (m.is_dir() and any(m.glob("*.done.json"))))

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
        for d in (self.root, self.samples_dir, self.embeddings_dir, self.cache_dir, self.sample_scores_dir,
                  self.markers_dir, self.attackers_dir, self.downloads_dir):
            for p in d.glob(".*.tmp-*") if d.is_dir() else ():
                p.unlink(missing_ok=True)
                n += 1
        return n

    def lock(self) -> OutputLock:
        """For an output on object storage: the lock of this machine's mirror (see
        :meth:`.remote_output.RemoteOutput.warn_unlocked`)."""
        return OutputLock(self.root / ".clipaudit.lock")

    def clear_map_outputs(self) -> None:
        """Remove everything the map step wrote (for ``--force``)."""
        for d in (self.samples_dir, self.embeddings_dir, self.cache_dir, self.sample_scores_dir, self.markers_dir,
                  self.tmp_dir, self.downloads_dir):
            shutil.rmtree(d, ignore_errors=True)
        for f in (self.identities, self.metrics, self.roc, self.calibration, self.summary, self.job_state,
                  self.reduce_state):
            f.unlink(missing_ok=True)


def output_layout(output: Path | str, storage_options: Mapping[str, Any] | None = None) -> OutputLayout:
    """The layout of a local output folder, or of an output URL (s3://, gs://, …) through its
    local mirror (not synced here: call ``layout.remote.pull()``)."""
    if isinstance(output, str) and is_url(output):
        remote = RemoteOutput.for_url(output, storage_options)
        return OutputLayout(remote.mirror, remote)
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
