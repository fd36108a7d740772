"""Per-job attack state (the name pool's text embeddings): built once, in parts, and kept by key.

An attack with per-job state declares how many items the state is sliced over
(``state_items``, e.g. the names; 0: no state), what it depends on besides the model
(``state_params``), and how to compute the slice of items ``[start, stop)``
(``state_slice``: float16, items along axis 1). The state is stored in parts of
:data:`ITEMS_PER_PART` items, ``<state dir>/<attack>-<key>/part-00000.npy`` …, and a
``manifest.json`` published after every part, under a key of (the model and its weight files,
precision, device type, the attack's parameters): a later job with the same key — on any machine,
e.g. the nightly re-audit — finds it and builds nothing. Parts are built independently (the Ray
executor spreads them over tasks with the map workers' resources) and a rerun builds only the
missing ones.

Workers read the parts memory-mapped: in place from a local folder, or, for a state on object
storage, from a copy in the node's scratch folder downloaded once per node — so the actors of
one node share one copy in the page cache. The driver never holds the state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipaudit.attacks.base import MapAttack
from clipaudit.data.storage import resolve_options
from clipaudit.data.urls import is_url
from clipaudit.io.atomic import atomic_write_json, temp_path
from clipaudit.io.outputs import OutputLayout
from clipaudit.io.store import Store, scratch_root
from clipaudit.model.files import content_fingerprint
from clipaudit.model.loading import LoadedModel
from clipaudit.spec import JobSpec

log = logging.getLogger(__name__)

#: items (names) per part: ViT-L-14 (D = 768) with 21 templates makes parts of 0.5 GB
ITEMS_PER_PART = 16_384
#: bump when a state's content changes meaning for the same key
STATE_FORMAT = 1


@dataclass(frozen=True)
class StatePlan:
    """One attack's state: its key, its size in items, and how it is cut into parts."""

    attack: str
    key: str
    items: int
    identity: dict[str, Any]
    part_items: int = ITEMS_PER_PART

    @property
    def folder(self) -> str:
        return f"{self.attack}-{self.key}"

    @property
    def parts(self) -> list[tuple[int, int]]:
        return [(a, min(a + self.part_items, self.items)) for a in range(0, self.items, self.part_items)]


def plan_state(spec: JobSpec, attack: MapAttack, part_items: int | None = None) -> StatePlan | None:
    """The state ``attack`` needs under ``spec`` (pinned: device and precision explicit), or None;
    ``part_items``: items per part (default :data:`ITEMS_PER_PART`, read when called)."""
    items = attack.state_items
    if not items:
        return None
    identity = {
        "format": STATE_FORMAT,
        "attack": attack.name,
        "model": spec.model.model_dump(mode="json"),
        "model_files": content_fingerprint(spec.model),
        "device_type": spec.compute.device.split(":")[0],
        **attack.state_params(),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return StatePlan(attack.name, digest, items, identity, part_items or ITEMS_PER_PART)


def state_store(spec: JobSpec, layout: OutputLayout) -> tuple[Store, Path]:
    """(store, folder) where ``spec`` keeps attack state: ``compute.state_dir``, else ``_state/``
    in the output's own store."""
    where = spec.compute.state_dir
    if where is None:
        return layout.store, layout.state_dir
    if is_url(where):
        store = Store.for_url(where, resolve_options(spec.data.storage_options))
        return store, store.base
    folder = Path(where).expanduser()
    return Store.local(folder), folder


class StateFolder:
    """The parts and manifest of one :class:`StatePlan` on a store."""

    def __init__(self, store: Store, base: Path, plan: StatePlan) -> None:
        self.store, self.plan = store, plan
        self.folder = base / plan.folder
        self.manifest_path = self.folder / "manifest.json"

    @property
    def where(self) -> str:
        return self.store.location(self.folder)

    def part_path(self, i: int) -> Path:
        return self.folder / f"part-{i:05d}.npy"

    def manifest(self) -> dict[str, Any] | None:
        """The manifest of a complete state with this key, else None."""
        m = self.store.read_json(self.manifest_path)
        return m if isinstance(m, dict) and m.get("key") == self.plan.key else None

    def missing(self) -> list[int]:
        """The parts not on the store yet (one listing)."""
        have = set(self.store.files(self.folder))
        return [i for i in range(len(self.plan.parts)) if self.part_path(i) not in have]

    def build(self, attack: MapAttack, model: LoadedModel, part_ids: list[int]) -> None:
        """Compute and publish the parts ``part_ids`` that are not on the store yet."""
        have = set(self.store.files(self.folder))
        for i in part_ids:
            path = self.part_path(i)
            if path in have:
                continue
            start, stop = self.plan.parts[i]
            self.publish_part(i, attack.state_slice(model, start, stop))
            log.info("%s state: part %d of %d built (%s)", self.plan.attack, i + 1, len(self.plan.parts), self.where)

    def publish_part(self, i: int, block: np.ndarray) -> None:
        """Write part ``i`` (R × its items × D, stored as float16) to the store in one step."""
        start, stop = self.plan.parts[i]
        block = np.ascontiguousarray(block, dtype=np.float16)
        if block.ndim != 3 or block.shape[1] != stop - start:
            raise ValueError(f"{self.plan.attack}: state slice [{start}, {stop}) has shape {block.shape}, "
                             f"expected (R, {stop - start}, D)")
        path = self.part_path(i)
        tmp = temp_path(path, self._tmp_dir())
        try:
            with open(tmp, "wb") as f:
                np.save(f, block, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            self.store.publish(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _tmp_dir(self) -> Path | None:
        """Where temp files go: beside their file in a local folder (None), the store's scratch
        ``_tmp/`` for object storage (the output's own scratch folder: its stale temps are cleared)."""
        if not self.store.remote:
            self.folder.mkdir(parents=True, exist_ok=True)
            return None
        return self.store.base / "_tmp"

    def finish(self) -> dict[str, Any]:
        """Check every part (their headers) and publish the manifest, which marks the state complete."""
        sizes = self.store.files(self.folder)
        parts, shape = [], None
        for i, (start, stop) in enumerate(self.plan.parts):
            path = self.part_path(i)
            if path not in sizes:
                raise FileNotFoundError(f"{self.plan.attack} state: part {i} is missing in {self.where}")
            with self.store.open(path) as f:
                part_shape = _npy_shape(f)
            if part_shape[1] != stop - start or (shape and part_shape[::2] != shape[::2]):
                raise ValueError(f"{self.plan.attack} state: part {i} in {self.where} has shape {part_shape}")
            shape = part_shape
            parts.append({"file": path.name, "start": start, "stop": stop, "bytes": sizes[path]})
        assert shape is not None
        manifest = {"key": self.plan.key, "identity": self.plan.identity, "items": self.plan.items,
                    "shape": [shape[0], self.plan.items, shape[2]], "dtype": "float16", "parts": parts}
        atomic_write_json(self.manifest_path, manifest, self._tmp_dir(), self.store.publish)
        return manifest

    def open(self) -> list[np.ndarray]:
        """The parts, memory-mapped read-only and in item order (a state on object storage is
        read from this node's copy, downloaded once)."""
        m = self.manifest()
        if m is None:
            raise FileNotFoundError(f"{self.plan.attack} state {self.plan.key}: no complete state in {self.where}")
        out = []
        for part in m["parts"]:
            path = self.folder / part["file"]
            if self.store.remote:
                local = scratch_root() / "state" / self.plan.folder / part["file"]
                if not local.is_file() or local.stat().st_size != part["bytes"]:
                    self.store.download(path, local)
                path = local
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.shape[1] != part["stop"] - part["start"] or arr.dtype != np.float16:
                raise ValueError(f"{self.plan.attack} state: {path} has shape {arr.shape} {arr.dtype}, "
                                 f"the manifest says {part['stop'] - part['start']} items of float16")
            out.append(arr)
        return out


def _npy_shape(f: Any) -> tuple[int, ...]:
    """The array shape in an ``.npy`` file's header (reads the header only)."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, _ = read(f)
    return tuple(shape)


def job_states(spec: JobSpec, layout: OutputLayout, attacks: list[MapAttack],
               part_items: int | None = None) -> list[tuple[MapAttack, StateFolder]]:
    """The state folder of every attack in ``attacks`` that has per-job state."""
    store, base = state_store(spec, layout)
    out = []
    for a in attacks:
        plan = plan_state(spec, a, part_items)
        if plan is not None:
            out.append((a, StateFolder(store, base, plan)))
    return out


def ensure_here(spec: JobSpec, layout: OutputLayout, attacks: list[MapAttack],
                model: LoadedModel) -> dict[str, list[np.ndarray]]:
    """Every attack's state, built in this process where the store does not hold it yet
    (the local executor's and the benches' path; the Ray executor spreads the building)."""
    out = {}
    for attack, folder in job_states(spec, layout, attacks):
        if folder.manifest() is None:
            log.info("%s state: building %d part(s) into %s", attack.name, len(folder.plan.parts), folder.where)
            folder.build(attack, model, list(range(len(folder.plan.parts))))
            folder.finish()
        out[attack.name] = folder.open()
    return out

