"""The map step: one shard in → one Parquet part (+ embeddings part) + marker out.

A plain function of (model, shard) → rows, used unchanged by every executor. Within a shard
three stages overlap: decoding runs in a thread pool (Pillow releases the GIL) one batch
ahead of the model; the model and attacks run on the current batch (its pixels copied to a
GPU from pinned memory, or decoded there, see :mod:`clipaudit.data.device_decode`); the
previous batch's Parquet rows are written on a writer thread. So the model never waits on
JPEG decode or Parquet encoding when there are enough CPU threads.

Across shards, :meth:`ShardMapper.map_shard` may be called from several threads at once
(``compute.shards_in_flight``): only the compute holds the mapper's lock, so one shard's tar
is fetched (a URL copied whole to the scratch folder) and another's parts are uploaded while a
third computes.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from clipaudit.attacks import MapAttack, build_attacks
from clipaudit.contract.registry import available
from clipaudit.attacks.base import MapBatch
from clipaudit.data.labels import Controls, ShardMatcher, control_set, read_labels
from clipaudit.data.samples import Sample, decode_with_pillow, prepare_sample
from clipaudit.data.tar_reader import RawSample, iter_tar_samples
from clipaudit.model.image_hash import difference_hashes
from clipaudit.model.loading import LoadedModel, load_model
from clipaudit.io.outputs import OutputLayout, PartWriter
from clipaudit.map.state import ensure_here
from clipaudit.contract.schemas import load_schema
from clipaudit.spec import JobSpec
from clipaudit.data.device_decode import decode_on_device
from clipaudit.data.shards import expand_shards, fetched_shard
from clipaudit.io.store import scratch_root

log = logging.getLogger(__name__)



@dataclass
class ShardStats:
    """What one map task did; merged by the driver into the job summary."""

    shard: str
    rows: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    embedding_rows: int | None = None
    #: the parts' sizes in bytes: with the markers' names they tell from one listing which shards are done
    bytes: int | None = None
    embedding_bytes: int | None = None
    seconds: float = 0.0
    map_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def always_scored(spec: JobSpec) -> Controls:
    """The units every attack's sample keeps (see ``SampleSpec``): the labelled identities and
    images, members and non-members alike, and the controls; image rows matched to the job's
    shards. Their content enters the map hash of a job that samples (see ``map_fingerprint``)."""
    matcher = ShardMatcher(expand_shards(spec.data.shards))
    opts = spec.data.storage_options
    controls = spec.calibration.controls
    out = control_set(controls, None, matcher, opts) if controls is not None else Controls()
    if spec.labels is not None:
        labels = read_labels(spec.labels, opts).matched(matcher)
        out.identities |= set(labels.identities)
        out.images |= set(labels.images)
    return out


def _batched(it: Iterator[RawSample], n: int) -> Iterator[list[RawSample]]:
    batch: list[RawSample] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class ShardMapper:
    """Holds the model and attacks of one worker; maps whole shards."""

    def __init__(self, spec: JobSpec, layout: OutputLayout, map_hash: str) -> None:
        self.spec = spec
        self.layout = layout
        self.attacks: list[MapAttack] = build_attacks(spec)
        self.model: LoadedModel | None = None
        # hashes the name pool and the weights: given by the driver, else once per worker (not per shard)
        self.map_hash = map_hash
        self.samples_schema = load_schema("samples", spec.attacks.enabled())  # core + attack columns
        # the bounded original is decoded only when an enabled attack cuts views from it
        needs_source = any(a.source_views for a in available(spec.plugins) if a.name in spec.attacks.enabled())
        self.source_side = spec.data.source_max_side if needs_source else None
        # auto (a spec the runner has not pinned, e.g. the bench's): gpu when the model is on CUDA, set in load()
        self.device_decode = spec.compute.decode == "gpu"
        self.embeddings_schema = load_schema("embeddings")
        #: attack → its sample (attacks.<name>.sample), and the units every sample keeps
        self.samples_of = {a.name: getattr(getattr(spec.attacks, a.name, None), "sample", None) for a in self.attacks}
        self.always_scored = always_scored(spec) if any(self.samples_of.values()) else None
        #: whether the main pass also keeps the patch tokens (an attack reads them from it)
        self.wants_tokens = any(getattr(a, "needs_patch_tokens", False) for a in self.attacks)
        self._pool = ThreadPoolExecutor(max_workers=spec.compute.decode_threads, thread_name_prefix="decode")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write")
        #: held while a shard computes (decode, model, attacks, Parquet encoding); fetches and uploads run outside it
        self._computing = threading.Lock()
        #: (shard, time.monotonic() when it took the lock) while a shard holds it; shards waiting for it
        self._computing_now: tuple[str, float] | None = None
        self._waiting: list[str] = []
        #: where this process copies URL shards; copies left by processes that are gone (a killed actor) are removed
        self._scratch = fetch_folder()

    # -- setup ----------------------------------------------------------------
    def load(self) -> LoadedModel:
        if self.model is None:
            m = self.spec.model
            self.model = load_model(m.name, m.pretrained, m.precision, self.spec.compute.device, seed=self.spec.seed)
            if self.spec.compute.decode == "gpu" and self.model.device.type != "cuda":
                raise ValueError(f"compute.decode: gpu needs the model on a CUDA device, it is on {self.model.device}")
            if self.spec.compute.decode == "auto":
                self.device_decode = self.model.device.type == "cuda"
        return self.model

    def setup(self, states: dict[str, list[np.ndarray]]) -> None:
        """Bind every attack to the model and its per-job state's parts (see :mod:`.state`)."""
        model = self.load()
        for a in self.attacks:
            a.bind(states.get(a.name), model, self.spec.compute.index)

    def setup_here(self) -> None:
        """:meth:`setup` with the state built in this process where its store lacks it."""
        self.setup(ensure_here(self.spec, self.layout, self.attacks, self.load()))

    # -- map ------------------------------------------------------------------
    def _decode(self, raws: list[RawSample], shard: str) -> list[Sample]:
        assert self.model is not None
        d = self.spec.data
        pre = self.model.preprocess
        return [prepare_sample(r, shard, d.identity_field, pre, d.max_image_pixels, self.source_side,
                               self.device_decode)
                for r in raws]

    def _finish_device_decode(self, samples: list[Sample]) -> dict[int, torch.Tensor]:
        """Decode the deferred JPEGs of a batch on the model's device; a file the device
        decoder rejects is decoded with Pillow (same error codes). Returns id(sample) → its
        uint8 S×S×3 pixels on the device."""
        assert self.model is not None
        pending = [s for s in samples if s.jpeg is not None]
        if not pending:
            return {}

        pre, d = self.model.preprocess, self.spec.data
        on_device, rejected = {}, []
        for s, out in zip(pending, decode_on_device([s.jpeg for s in pending], pre, self.model.device,  # type: ignore[misc]
                                                    self.source_side)):
            if out is None:  # decoded by Pillow on the decode threads, not on this one
                rejected.append(self._pool.submit(decode_with_pillow, s, pre, d.max_image_pixels, self.source_side))
                continue
            s.jpeg = None
            on_device[id(s)] = out[0]
            if out[1] is not None:
                s.source = out[1].numpy()
        for f in rejected:
            f.result()
        return on_device

    def decoded_batches(self, shard: str, source: str | None = None) -> Iterator[list[Sample]]:
        """Decode batch i+1 on the thread pool while the caller runs the model on batch i.
        ``source``: where the shard's bytes are read (a local copy of it), if not ``shard`` itself."""
        raw_batches = _batched(iter_tar_samples(source or shard, self.spec.data.storage_options),
                               self.spec.compute.batch_size)
        threads = self.spec.compute.decode_threads
        pending: tuple[list[Future], int] | None = None
        for raws in raw_batches:
            chunks = [raws[i::threads] for i in range(threads)]
            futs = [self._pool.submit(self._decode, c, shard) for c in chunks if c]
            if pending is not None:
                yield _interleave([f.result() for f in pending[0]], pending[1])
            pending = (futs, len(raws))
        if pending is not None:
            yield _interleave([f.result() for f in pending[0]], pending[1])

    def _in_sample(self, attack: str, s: Sample, taken: Counter[str]) -> bool:
        """Whether sample ``s`` is scored by an attack with a sample (see ``SampleSpec``);
        ``taken``: the images of each identity this attack scored so far in this shard."""
        always = self.always_scored
        if always is not None and always.is_control(s.identity, s.shard, s.key):
            return True
        if taken[s.identity or ""] >= self.samples_of[attack].per_identity:  # type: ignore[union-attr]
            return False
        taken[s.identity or ""] += 1
        return True

    def _compute(self, a: MapAttack, batch: MapBatch, sampled: dict[str, Counter[str]]) -> dict[str, list]:
        """An attack's columns for the batch: every row, or (with a sample) the sampled rows and
        None for the others."""
        if a.name not in sampled:
            return a.compute(batch)
        keep = [i for i, s in enumerate(batch.samples) if self._in_sample(a.name, s, sampled[a.name])]
        if not keep:
            return {}
        rows = torch.tensor(keep, device=batch.images.device)
        sub = MapBatch([batch.samples[i] for i in keep], batch.images.index_select(0, rows),
                       batch.emb.index_select(0, rows.to(batch.emb.device)), batch.model, batch.seed, batch.chunk,
                       None if batch.sources is None else [batch.sources[i] for i in keep],
                       None if batch.tokens is None else batch.tokens.index_select(0, rows.to(batch.tokens.device)))
        out: dict[str, list] = {}
        for name, values in a.compute(sub).items():
            full: list = [None] * len(batch.samples)
            for i, v in zip(keep, values):
                full[i] = v
            out[name] = full
        return out

    def _rows(self, samples: list[Sample], sampled: dict[str, Counter[str]] | None = None
              ) -> tuple[dict[str, list], np.ndarray | None]:
        on_device = self._finish_device_decode(samples)
        ok = [s for s in samples if s.ok]
        attack_cols: dict[str, list] = {}
        emb_np = None
        if ok:
            assert self.model is not None
            if on_device:
                dev = self.model.device
                pixels = torch.stack([on_device[id(s)] if id(s) in on_device else
                                      torch.tensor(s.pixels, device=dev) for s in ok])
            else:
                pixels = torch.from_numpy(np.stack([s.pixels for s in ok]))
                if self.model.device.type == "cuda":
                    pixels = pixels.pin_memory()  # the host→device copy in to_unit runs asynchronously
            hashes = difference_hashes(pixels)
            images = self.model.to_unit(pixels)
            chunk = self.spec.compute.batch_size
            tokens = None
            if self.wants_tokens and self.model.has_patch_tokens:  # one pass gives the embedding and the tokens
                emb, tokens = self.model.encode_unit_tokens(images, chunk)
            else:
                emb = self.model.encode_unit(images, chunk)
            sources = [s.source for s in ok] if self.source_side is not None else None
            batch = MapBatch(ok, images, emb, self.model, self.spec.seed, chunk, sources, tokens)
            for a in self.attacks:
                attack_cols.update(self._compute(a, batch, sampled or {}))
            emb_np = emb.to(torch.float16).cpu().numpy()
            attack_cols["dhash"] = hashes
        cols: dict[str, list] = {f.name: [] for f in self.samples_schema}
        ok_pos = {id(s): i for i, s in enumerate(ok)}
        for s in samples:
            cols["shard"].append(s.shard)
            cols["key"].append(s.key)
            cols["position"].append(s.position)
            cols["identity"].append(s.identity)
            cols["status"].append("ok" if s.ok else "error")
            cols["error"].append(s.error)
            cols["error_detail"].append(s.detail)
            cols["warning"].append(s.warning if s.ok else None)
            cols["width"].append(s.width)
            cols["height"].append(s.height)
            cols["has_caption"].append(s.caption is not None if s.ok else None)
            cols["caption"].append(s.caption if s.ok else None)
            i = ok_pos.get(id(s))
            for name in cols:
                if name in attack_cols:
                    cols[name].append(None if i is None else attack_cols[name][i])
        for name in cols:  # attacks that are off: all null
            if len(cols[name]) != len(samples):
                cols[name] = [None] * len(samples)
        return cols, emb_np

    def map_shard(self, shard: str, on_batch: Callable[[int], None] | None = None) -> ShardStats:
        """Map one shard to its part(s) and marker; returns its stats. Safe to call from several
        threads: the shard is fetched before, and its parts published after, the compute lock."""
        t0 = time.perf_counter()
        with fetched_shard(shard, self.spec.data.storage_options, self._scratch) as source:
            self._waiting.append(shard)
            try:
                self._computing.acquire()
                # computing before it stops waiting: a status read in between never finds it in neither
                self._computing_now = (shard, time.monotonic())
            finally:
                self._waiting.remove(shard)
            try:
                stats, parts = self._map(shard, source, on_batch)
            finally:
                self._computing_now = None
                self._computing.release()
        self._publish(shard, stats, parts, t0)
        return stats

    def compute_status(self) -> dict[str, Any]:
        """Which shard computes and for how many seconds (``computing``: None when none does), and
        which shards wait for the compute lock (``waiting``); shards being fetched or published are
        in neither. Lets a driver tell a shard stuck in its own work from one queued behind another."""
        now, waiting = self._computing_now, list(self._waiting)
        return {"computing": None if now is None else now[0],
                "computing_s": 0.0 if now is None else time.monotonic() - now[1], "waiting": waiting}

    def _map(self, shard: str, source: str, on_batch: Callable[[int], None] | None
             ) -> tuple[ShardStats, list[PartWriter]]:
        """The shard's rows, written to its parts (complete, not yet published), and its stats."""
        stats = ShardStats(shard=shard, map_hash=self.map_hash)
        counts: Counter[str] = Counter()
        warnings: Counter[str] = Counter()
        sampled: dict[str, Counter[str]] = {name: Counter() for name, sample in self.samples_of.items() if sample}
        self.layout.make_dirs()
        tmp = self.layout.tmp_dir
        part = PartWriter(self.layout.sample_part(shard), self.samples_schema, tmp)
        emb_part = (PartWriter(self.layout.embedding_part(shard), self.embeddings_schema, tmp)
                    if self.spec.store_embeddings else None)
        parts = [part] if emb_part is None else [part, emb_part]

        def write(samples: list[Sample], cols: dict[str, list], emb: np.ndarray | None) -> None:
            part.write(cols)
            ok = [s for s in samples if s.ok]
            if emb_part is not None and ok:
                emb_part.write({
                    "shard": [s.shard for s in ok], "key": [s.key for s in ok],
                    "position": [s.position for s in ok], "embedding": list(emb),
                })

        # Parquet encoding of batch i runs on the writer thread while the model runs on batch
        # i+1 (decode of i+2 is on the decode threads); at most one batch waits to be written
        pending: Future | None = None
        try:
            for samples in self.decoded_batches(shard, source):
                cols, emb = self._rows(samples, sampled)
                if pending is not None:
                    pending.result()
                pending = self._writer.submit(write, samples, cols, emb)
                counts.update(s.error or "ok" for s in samples)
                warnings.update(s.warning for s in samples if s.ok and s.warning)
                if on_batch is not None:
                    on_batch(len(samples))
            if pending is not None:
                pending.result()
        except BaseException:
            if pending is not None:
                wait([pending])  # the writer is done with the files before they are removed
            for p in parts:
                p.abort()
            raise
        stats.rows = part.rows
        stats.ok = counts.pop("ok", 0)
        stats.errors = dict(sorted(counts.items()))
        stats.warnings = dict(sorted(warnings.items()))
        return stats, parts

    def _publish(self, shard: str, stats: ShardStats, parts: list[PartWriter], t0: float) -> None:
        """The parts renamed into place (or uploaded, one upload each), then the marker that vouches for them."""
        store = self.layout.store
        part, emb_part = parts[0], (parts[1] if len(parts) > 1 else None)
        try:
            part.commit(store)
            stats.bytes = part.bytes
            if emb_part is not None:
                emb_part.commit(store)
                stats.embedding_rows, stats.embedding_bytes = emb_part.rows, emb_part.bytes
            stats.seconds = time.perf_counter() - t0
            # last: vouches for the parts
            self.layout.write_json(self.layout.marker(shard), stats.to_dict())
        except BaseException:  # no part may stay without its marker (the shard is retried or failed)
            for p in parts:
                p.abort()  # temp files (a second close is a no-op)
            # the marker first: it may have reached the store before its upload reported an error
            self.layout.unpublish(self.layout.marker(shard), *(p.path for p in parts))
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=True)


def fetch_folder() -> Path:
    """This process's folder for whole copies of URL shards, under the scratch root; the folders
    of processes no longer running on this node (an actor the driver killed mid-fetch cannot
    remove its copies) are removed first."""
    root = scratch_root() / "shards"
    if root.is_dir():
        for folder in root.iterdir():
            if folder.name.isdigit() and int(folder.name) != os.getpid() and not _running(int(folder.name)):
                shutil.rmtree(folder, ignore_errors=True)
    return root / str(os.getpid())


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _interleave(chunks: list[list[Sample]], n: int) -> list[Sample]:
    """Undo ``raws[i::k]`` chunking so samples keep their shard order."""
    out: list[Sample] = [None] * n  # type: ignore[list-item]
    k = len(chunks)
    for i, chunk in enumerate(chunks):
        out[i::k] = chunk
    return out
