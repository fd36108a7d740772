"""Per-job attack state (name-pool text embeddings), cached under ``_cache/`` by map hash."""

from __future__ import annotations

import io
from typing import Any
from collections.abc import Callable

import numpy as np

from clipaudit.io.outputs import OutputLayout
from clipaudit.io.atomic import atomic_write_bytes
from clipaudit.spec import JobSpec


def load_or_compute_shared(layout: OutputLayout, spec: JobSpec, compute: Callable[[], dict[str, Any]],
                           map_hash: str) -> dict[str, Any]:
    """Reuse the cached state of an earlier (interrupted) run of the same job — same map hash,
    so the same weights and name pool — else compute it."""
    path = layout.cache_dir / f"shared-{map_hash}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    shared = compute()
    arrays = {k: v for k, v in shared.items() if isinstance(v, np.ndarray)}
    layout.make_dirs()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue(), layout.tmp_dir)
    return {k: shared.get(k) for k in shared}
