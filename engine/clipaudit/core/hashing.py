"""The one file-hash helper: checkpoints, plugins, name pools and ingested URL lists are
fingerprinted with it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_SHA256_MEMO: dict[tuple, str] = {}


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks; remembered per process while the file's identity,
    size and modification time stay the same (a checkpoint is hashed once per job, not per shard)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA256_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _SHA256_MEMO[key] = h.hexdigest()
    return _SHA256_MEMO[key]
