"""The candidate-embedding index: near-duplicates inside the audit, and nearest neighbours in
a reference index. Both run in memory that does not grow with the audit.

* :func:`near_duplicates` — re-uploads and resized copies of one identity's images, so that
  copies do not count as independent votes: two images of the same identity are copies when
  their embeddings' cosine is at least ``min_cosine`` *and* their difference hashes
  (``samples.dhash``) differ in at most ``max_hash_bits`` of 64. The hash condition is what
  keeps different photos of one person apart: on a weak model their embeddings can be closer
  than a copy's (canary lab: copies ≥ 0.995, other photos of the same person up to 0.997),
  while their hashes differ in 11+ bits (copies: ≤ 4). Copies form groups (transitively);
  each group's first image by (shard, position) is kept, the others name it in
  ``near_duplicates.parquet``. DuckDB first writes the ok images' embeddings, partitioned by a
  hash of their identity, under ``OUT/_tmp`` (spilling beyond its memory limit); each
  partition (~:data:`ROWS_PER_BUCKET` images) is then searched identity by identity. The same
  photo under two names is not merged: its copies vote for different names.
* :func:`reference_matches` — each ok image's nearest neighbour in a user-provided FAISS index
  (e.g. of a public training set's embeddings; inner product on L2-normalised vectors),
  streamed part by part into the output file.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipaudit.core.errors import ClipauditError
from clipaudit.io.outputs import OutputLayout
from clipaudit.model.image_hash import hamming
from clipaudit.io.outputs import PartWriter
from clipaudit.io.store import Store
from clipaudit.reduce.tables import REDUCE_MEMORY, connect

NEAR_DUPLICATES_SCHEMA = pa.schema([
    pa.field("shard", pa.string()), pa.field("key", pa.string()), pa.field("position", pa.int64()),
    pa.field("near_duplicate_of_shard", pa.string()), pa.field("near_duplicate_of_key", pa.string()),
    pa.field("near_duplicate_of_position", pa.int64()), pa.field("cosine", pa.float32()),
    pa.field("hash_bits", pa.int32()),
])
REFERENCE_SCHEMA = pa.schema([
    pa.field("shard", pa.string()), pa.field("key", pa.string()), pa.field("position", pa.int64()),
    pa.field("reference_similarity", pa.float32()), pa.field("reference_id", pa.int64()),
])


class NeighboursError(ClipauditError, ValueError):
    """The embeddings or the reference index cannot be used."""


class Copies:
    """The near-duplicate copies of ``near_duplicates.parquet`` (not the images their groups
    keep), held as sorted positions per shard: 8 bytes per copy."""

    def __init__(self, by_shard: dict[str, np.ndarray]) -> None:
        self.by_shard = by_shard

    @classmethod
    def load(cls, path: Path | None, store: Store) -> Copies | None:
        """None without a path (``--near-duplicates`` off); read through the output's ``store``."""
        if path is None:
            return None
        with store.open(path) as f:
            t = pq.read_table(f, columns=["shard", "position"])
        shards = np.array(t.column("shard").to_pylist(), dtype=object)
        positions = t.column("position").to_numpy(zero_copy_only=False).astype(np.int64)
        return cls({str(s): np.sort(positions[shards == s]) for s in np.unique(shards)} if len(shards) else {})

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_shard.values())

    @staticmethod
    def of(copies: Copies | None, t: pa.Table) -> np.ndarray:
        """:meth:`mask` of ``copies``, or no copy at all without them (``--near-duplicates`` off)."""
        return copies.mask(t) if copies is not None else np.zeros(t.num_rows, dtype=bool)

    def mask(self, t: pa.Table) -> np.ndarray:
        """True for the rows of ``t`` (with ``shard`` and ``position``) that are copies."""
        out = np.zeros(t.num_rows, dtype=bool)
        if not self.by_shard or not t.num_rows:
            return out
        shards = np.array(t.column("shard").to_pylist(), dtype=object)
        positions = t.column("position").to_numpy(zero_copy_only=False)
        for s in np.unique(shards):
            known = self.by_shard.get(str(s))
            if known is not None:
                here = shards == s
                out[here] = np.isin(positions[here], known)
        return out


def _parts(layout: OutputLayout) -> list[Path]:
    parts = layout.store.glob(layout.embeddings_dir)
    if not parts:
        raise NeighboursError(f"{layout.where}: embeddings/ holds no embeddings: run the audit with "
                              "store_embeddings: true")
    return parts


def _batches(layout: OutputLayout) -> Iterator[tuple[list[str], list[str], list[int], np.ndarray]]:
    """(shards, keys, positions, float32 unit vectors) per embeddings part."""
    for part in _parts(layout):
        with layout.store.open(part) as f:
            t = pq.read_table(f, columns=["shard", "key", "position", "embedding"])
        if not t.num_rows:
            continue
        emb = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                         dtype=np.float32).reshape(t.num_rows, -1)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # stored as fp16
        yield t.column("shard").to_pylist(), t.column("key").to_pylist(), t.column("position").to_pylist(), emb


#: images per identity-hash partition of the near-duplicate search (×D×4 bytes in memory)
ROWS_PER_BUCKET = 100_000


def near_duplicates(layout: OutputLayout, out: Path, min_cosine: float = 0.95, max_hash_bits: int = 6,
                    memory_limit: str | None = None) -> int:
    """Write ``out`` (one row per copy, not for the image each group keeps; see the module
    docstring); returns its row count."""
    import shutil
    import uuid


    _parts(layout)  # a clear error without embeddings
    con = connect(layout, memory_limit=memory_limit or REDUCE_MEMORY, tables=("samples", "embeddings"))
    spill = layout.tmp_dir / f"near-duplicates-{uuid.uuid4().hex[:8]}"
    try:
        try:  # DuckDB writes the partitions and is closed before they are searched (its memory freed)
            n, hashed = con.execute("SELECT count(*), count(dhash) FROM samples WHERE status = 'ok'").fetchone()
            if n and not hashed:
                raise NeighboursError("samples/ has no dhash column values: re-run the map step with this version")
            buckets = max(1, -(-n // ROWS_PER_BUCKET))
            con.execute(f"""
                COPY (SELECT e.shard, e.key, e.position, coalesce(s.identity, '') AS identity, s.dhash, e.embedding,
                             hash(coalesce(s.identity, '')) % {buckets} AS bucket
                      FROM embeddings e JOIN samples s ON s.shard = e.shard AND s.position = e.position
                      WHERE s.status = 'ok' AND s.dhash IS NOT NULL)
                TO '{str(spill).replace("'", "''")}' (FORMAT parquet, PARTITION_BY (bucket))""")
        finally:
            con.close()
        found: list[tuple] = []
        for part in sorted(spill.glob("bucket=*/*.parquet")):
            found += _copies_in_bucket(pq.read_table(part), min_cosine, max_hash_bits)
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    found.sort(key=lambda r: (r[0], r[2]))
    writer = PartWriter(out, NEAR_DUPLICATES_SCHEMA, layout.tmp_dir)
    writer.write({name: [r[i] for r in found] for i, name in enumerate(NEAR_DUPLICATES_SCHEMA.names)})
    writer.commit(layout.store)
    return len(found)


def _copies_in_bucket(t: pa.Table, min_cosine: float, max_hash_bits: int) -> list[tuple]:
    """Near-duplicate rows (in :data:`NEAR_DUPLICATES_SCHEMA`'s column order) among the images
    of each identity in one partition."""
    import faiss

    t = t.sort_by([("identity", "ascending"), ("shard", "ascending"), ("position", "ascending")])
    ident = np.asarray(t.column("identity").to_pylist(), dtype=object)
    shards, keys = t.column("shard").to_pylist(), t.column("key").to_pylist()
    positions, hashes = t.column("position").to_pylist(), t.column("dhash").to_pylist()
    bounds = np.r_[0, np.flatnonzero(ident[1:] != ident[:-1]) + 1, len(ident)] if len(ident) else np.r_[0]
    rows: list[tuple] = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi - lo < 2:
            continue
        emb = np.array(t.column("embedding").slice(lo, hi - lo).combine_chunks().flatten()
                       .to_numpy(zero_copy_only=False), dtype=np.float32).reshape(hi - lo, -1)  # a writable copy
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # stored as fp16
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        lims, sims, found = index.range_search(emb, min_cosine)
        parent = list(range(hi - lo))

        def root(i: int, parent: list[int] = parent) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        best: dict[int, tuple[float, int]] = {}  # copy → (cosine, hash bits) of the link that made it one
        for i in range(hi - lo):
            for j, sim in zip(found[lims[i]:lims[i + 1]], sims[lims[i]:lims[i + 1]]):
                j = int(j)
                if j <= i or (bits := hamming(hashes[lo + i], hashes[lo + j])) > max_hash_bits:
                    continue
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                for k in (i, j):
                    if k not in best or sim > best[k][0]:
                        best[k] = (float(sim), bits)
        first: dict[int, int] = {}
        for k in range(hi - lo):  # rows are in (shard, position) order: each group keeps its first image
            keep = first.setdefault(root(k), k)
            if keep != k:
                a, b = lo + k, lo + keep
                rows.append((shards[a], keys[a], positions[a], shards[b], keys[b], positions[b], *best[k]))
    return rows


def reference_matches(layout: OutputLayout, reference: str | Path, out: Path) -> int:
    """Write ``out``: each ok image's nearest neighbour (inner product) in the FAISS index at
    ``reference``, one embeddings part at a time; returns its row count."""
    import faiss


    if not Path(reference).is_file():
        raise NeighboursError(f"--reference: file not found: {reference}")
    try:
        index = faiss.read_index(str(reference))
    except RuntimeError as e:
        raise NeighboursError(f"--reference: {reference} is not a FAISS index: {str(e).splitlines()[0]}") from None
    if index.ntotal == 0:
        raise NeighboursError(f"--reference: {reference} holds no vectors")
    writer = PartWriter(out, REFERENCE_SCHEMA, layout.tmp_dir)
    try:
        for shards, keys, positions, emb in _batches(layout):
            if emb.shape[1] != index.d:
                raise NeighboursError(f"--reference: the index holds {index.d}-dimensional vectors, this audit's "
                                      f"embeddings have {emb.shape[1]} (another model?)")
            sims, found = index.search(emb, 1)
            writer.write({"shard": shards, "key": keys, "position": positions,
                          "reference_similarity": sims[:, 0].tolist(), "reference_id": found[:, 0].tolist()})
    except BaseException:
        writer.abort()
        raise
    writer.commit(layout.store)
    return writer.rows
