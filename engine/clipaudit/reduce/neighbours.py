"""The candidate-embedding index: near-duplicates inside the audit, and nearest neighbours in
a reference index.

Both stream the ``embeddings/`` parts (one part in memory at a time besides the index, which
holds every ok image's embedding: N × D × 4 bytes, e.g. 20 GB for 10^7 ViT-B/32 images).

* :func:`near_duplicates` — re-uploads and resized copies inside the candidate set, so that
  copies do not count as independent votes: two images are copies when their embeddings'
  cosine is at least ``min_cosine`` *and* their difference hashes (``samples.dhash``) differ in
  at most ``max_hash_bits`` of 64. The hash condition is what keeps different photos of one
  person apart: on a weak model their embeddings can be closer than a copy's (canary lab:
  copies ≥ 0.995, other photos of the same person up to 0.997), while their hashes differ in
  11+ bits (copies: ≤ 4). Copies form groups (transitively); each group's first image by
  (shard, position) is kept, the others name it in ``near_duplicates.parquet``.
* :func:`reference_matches` — each ok image's nearest neighbour in a user-provided FAISS index
  (e.g. of a public training set's embeddings; inner product on L2-normalised vectors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..io.outputs import OutputLayout
from ..map.image_hash import hamming

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


class NeighboursError(ValueError):
    """The embeddings or the reference index cannot be used."""


def _parts(layout: OutputLayout) -> list[Path]:
    parts = sorted(layout.embeddings_dir.glob("*.parquet")) if layout.embeddings_dir.is_dir() else []
    if not parts:
        raise NeighboursError(f"{layout.embeddings_dir} holds no embeddings: run the audit with store_embeddings: true")
    return parts


def _batches(layout: OutputLayout) -> Iterator[tuple[list[str], list[str], list[int], np.ndarray]]:
    """(shards, keys, positions, float32 unit vectors) per embeddings part."""
    for part in _parts(layout):
        t = pq.read_table(part, columns=["shard", "key", "position", "embedding"])
        if not t.num_rows:
            continue
        emb = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                         dtype=np.float32).reshape(t.num_rows, -1)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # stored as fp16
        yield t.column("shard").to_pylist(), t.column("key").to_pylist(), t.column("position").to_pylist(), emb


def _hashes(layout: OutputLayout) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for part in sorted(layout.samples_dir.glob("*.parquet")):
        t = pq.read_table(part, columns=["shard", "position", "dhash"])
        for s, p, h in zip(*(t.column(c).to_pylist() for c in ("shard", "position", "dhash"))):
            if h is not None:
                out[(s, p)] = h
    return out


def near_duplicates(layout: OutputLayout, min_cosine: float = 0.95, max_hash_bits: int = 6) -> pa.Table:
    """One row per copy (not for the image each group keeps): see the module docstring."""
    import faiss

    ids: list[tuple[str, str, int]] = []
    index = None
    for shards, keys, positions, emb in _batches(layout):
        if index is None:
            index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        ids += list(zip(shards, keys, positions))
    if index is None:
        return NEAR_DUPLICATES_SCHEMA.empty_table()
    hashes = _hashes(layout)
    if not hashes:
        raise NeighboursError("samples/ has no dhash column values: re-run the map step with this version")
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    best: dict[int, tuple[float, int]] = {}  # copy → (cosine, hash bits) of the link that made it one
    start = 0
    for _, _, _, emb in _batches(layout):
        lims, sims, found = index.range_search(emb, min_cosine)
        for q in range(len(emb)):
            i = start + q
            hi = hashes.get((ids[i][0], ids[i][2]))
            for j, sim in zip(found[lims[q]:lims[q + 1]], sims[lims[q]:lims[q + 1]]):
                j = int(j)
                if j <= i:
                    continue
                hj = hashes.get((ids[j][0], ids[j][2]))
                if hi is None or hj is None or (bits := hamming(hi, hj)) > max_hash_bits:
                    continue
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
                for k in (i, j):
                    if k not in best or sim > best[k][0]:
                        best[k] = (float(sim), bits)
        start += len(emb)
    order = sorted(range(len(ids)), key=lambda k: (ids[k][0], ids[k][2]))
    first: dict[int, int] = {}
    for k in order:  # each group keeps its first image by (shard, position)
        first.setdefault(root(k), k)
    rows = [(k, first[root(k)]) for k in order if first[root(k)] != k]
    cols = {name: [] for name in NEAR_DUPLICATES_SCHEMA.names}
    for k, keep in rows:
        for name, value in zip(NEAR_DUPLICATES_SCHEMA.names,
                               (*ids[k][:1], ids[k][1], ids[k][2], ids[keep][0], ids[keep][1], ids[keep][2],
                                best[k][0], best[k][1])):
            cols[name].append(value)
    return pa.table(cols, schema=NEAR_DUPLICATES_SCHEMA)


def reference_matches(layout: OutputLayout, reference: str | Path) -> pa.Table:
    """Each ok image's nearest neighbour (inner product) in the FAISS index at ``reference``."""
    import faiss

    if not Path(reference).is_file():
        raise NeighboursError(f"--reference: file not found: {reference}")
    try:
        index = faiss.read_index(str(reference))
    except RuntimeError as e:
        raise NeighboursError(f"--reference: {reference} is not a FAISS index: {str(e).splitlines()[0]}") from None
    if index.ntotal == 0:
        raise NeighboursError(f"--reference: {reference} holds no vectors")
    cols: dict[str, list] = {name: [] for name in REFERENCE_SCHEMA.names}
    for shards, keys, positions, emb in _batches(layout):
        if emb.shape[1] != index.d:
            raise NeighboursError(f"--reference: the index holds {index.d}-dimensional vectors, this audit's "
                                  f"embeddings have {emb.shape[1]} (another model?)")
        sims, found = index.search(emb, 1)
        cols["shard"] += shards
        cols["key"] += keys
        cols["position"] += positions
        cols["reference_similarity"] += sims[:, 0].tolist()
        cols["reference_id"] += found[:, 0].tolist()
    return pa.table(cols, schema=REFERENCE_SCHEMA)
