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
  hash of their identity, under ``OUT/_tmp`` (spilling beyond its memory limit); in each
  partition (~:data:`ROWS_PER_BUCKET` images) the candidate pairs come from the hashes of all
  its images at once (FAISS's binary multi-hash index, exact within ``max_hash_bits``), are
  confirmed by the cosine of the pair alone, and are grouped by connected components: no step
  compares every pair of an identity's images. The same photo under two names is not merged:
  its copies vote for different names.
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


def hash_pairs(hashes: np.ndarray, max_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) of 64-bit hashes at most ``max_bits`` apart, with their distance:
    FAISS's binary multi-hash index (4 tables of 16 bits, ``max_bits // 4`` flips each). Exact,
    by pigeonhole: two hashes within ``max_bits`` agree, up to that many flips, on some table."""
    import faiss

    n = len(hashes)
    if n < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    codes = np.ascontiguousarray(np.asarray(hashes, dtype=np.int64).view(np.uint8).reshape(n, 8))
    index = faiss.IndexBinaryMultiHash(64, 4, 16)
    index.nflip = max_bits // 4
    index.add(codes)
    lims, dist, found = index.range_search(codes, max_bits + 1)  # distances below the radius
    first = np.repeat(np.arange(n, dtype=np.int64), np.diff(lims).astype(np.int64))
    second = found.astype(np.int64)
    keep = second > first
    return first[keep], second[keep], dist[keep].astype(np.int64)


#: rows per hash search: whole identities up to this many (an identity with more is searched alone),
#: so a hash many identities share (a placeholder image) makes pairs within a block, not the partition
ROWS_PER_SEARCH = 8192


def _identity_blocks(ident: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of identity-sorted rows, each of whole identities and at most
    :data:`ROWS_PER_SEARCH` rows unless one identity alone has more."""
    n = len(ident)
    if not n:
        return []
    starts = np.r_[0, np.flatnonzero(ident[1:] != ident[:-1]) + 1]
    ends = np.r_[starts[1:], n]
    blocks, lo = [], 0
    for start, end in zip(starts.tolist(), ends.tolist()):
        if end - lo > ROWS_PER_SEARCH and start > lo:  # this identity would overfill the block: close it before
            blocks.append((lo, start))
            lo = start
    blocks.append((lo, n))
    return blocks


def _copies_in_bucket(t: pa.Table, min_cosine: float, max_hash_bits: int) -> list[tuple]:
    """Near-duplicate rows (in :data:`NEAR_DUPLICATES_SCHEMA`'s column order) in one partition:
    candidate pairs from the hashes of all its images at once (:func:`hash_pairs`), kept where
    both are of one identity and their embeddings' cosine is at least ``min_cosine``, grouped
    by connected components (SciPy); each group keeps its first image by (shard, position)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = t.num_rows
    if n < 2:
        return []
    t = t.sort_by([("identity", "ascending"), ("shard", "ascending"), ("position", "ascending")])
    ident = np.asarray(t.column("identity").to_pylist(), dtype=object)
    hashes = t.column("dhash").to_numpy(zero_copy_only=False)
    found = []
    for lo, hi in _identity_blocks(ident):  # pairs across identities never count: search blocks of whole identities
        a, b, d = hash_pairs(hashes[lo:hi], max_hash_bits)
        same = ident[lo + a] == ident[lo + b]
        found.append((lo + a[same], lo + b[same], d[same]))
    first, second, bits = (np.concatenate(x) for x in zip(*found))
    if not len(first):
        return []
    # the embeddings of the images in a candidate pair only (stored as fp16: normalised again)
    rows = np.unique(np.r_[first, second])
    emb = np.array(t.column("embedding").take(pa.array(rows)).combine_chunks().flatten()
                   .to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(rows), -1)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    a, b = np.searchsorted(rows, first), np.searchsorted(rows, second)
    cosine = np.einsum("ij,ij->i", emb[a], emb[b])
    close = cosine >= min_cosine
    first, second, bits, cosine = first[close], second[close], bits[close], cosine[close]
    if not len(first):
        return []
    _, group = connected_components(coo_matrix((np.ones(len(first)), (first, second)), shape=(n, n)), directed=False)
    keeper = np.full(group.max() + 1, n)
    np.minimum.at(keeper, group, np.arange(n))  # rows are in (identity, shard, position) order
    # each copy's best link: the highest cosine among its confirmed pairs, with that pair's hash bits
    node, sim, link_bits = np.r_[first, second], np.r_[cosine, cosine], np.r_[bits, bits]
    order = np.lexsort((-sim, node))
    head = order[np.r_[True, node[order][1:] != node[order][:-1]]]
    best = {int(node[k]): (float(sim[k]), int(link_bits[k])) for k in head}
    shards, keys = t.column("shard").to_pylist(), t.column("key").to_pylist()
    positions = t.column("position").to_pylist()
    out = []
    for k in np.flatnonzero(keeper[group] != np.arange(n)):
        keep = int(keeper[group[k]])
        out.append((shards[k], keys[k], positions[k], shards[keep], keys[keep], positions[keep], *best[int(k)]))
    return out


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
