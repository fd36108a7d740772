"""Shard listing (brace patterns ``{00000..00009}``, globs, explicit lists) and opening:
local paths directly, URLs (``s3://``, ``gs://``, ``https://``, ``hf://`` …) through fsspec."""

from __future__ import annotations

import glob
import itertools
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from collections.abc import Iterator, Mapping

from clipaudit.core.errors import ClipauditError
from clipaudit.data.storage import open_url
from clipaudit.data.urls import is_url

_BRACE = re.compile(r"\{([^{}]*)\}")


class ShardPatternError(ClipauditError, ValueError):
    """A shard pattern that lists nothing or cannot be parsed."""


def _expand_braces(pattern: str) -> list[str]:
    parts: list[list[str]] = []
    pos = 0
    for m in _BRACE.finditer(pattern):
        parts.append([pattern[pos : m.start()]])
        body = m.group(1)
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if rng:
            lo, hi = rng.group(1), rng.group(2)
            if int(hi) < int(lo):
                raise ShardPatternError(f"empty range {{{body}}} in {pattern!r}")
            width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
            parts.append([str(i).zfill(width) for i in range(int(lo), int(hi) + 1)])
        elif "," in body:
            parts.append(body.split(","))
        else:
            raise ShardPatternError(f"cannot expand {{{body}}} in {pattern!r}: use {{a..b}} or {{x,y}}")
        pos = m.end()
    parts.append([pattern[pos:]])
    return ["".join(p) for p in itertools.product(*parts)]


def expand_shards(shards: str | list[str]) -> list[str]:
    """List shard paths in order, without duplicates. Globs must match something."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    out: list[str] = []
    for pattern in patterns:
        for item in _expand_braces(pattern):
            if any(c in item for c in "*?[") and is_url(item):
                raise ShardPatternError(f"{item!r}: globs are not expanded for URLs; use a brace pattern "
                                        "({00000..00099}) or a list")
            if any(c in item for c in "*?["):
                matched = sorted(glob.glob(item))
                if not matched:
                    raise ShardPatternError(f"no file matches {item!r}")
                out.extend(matched)
            else:
                out.append(item)
    if not out:
        raise ShardPatternError("no shards listed")
    seen: set[str] = set()
    return [s for s in out if not (s in seen or seen.add(s))]


@contextmanager
def open_shard(shard: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[tuple[BinaryIO, int]]:
    """A seekable binary file and its size in bytes, for a local path or a URL (opened with
    the job's ``data.storage_options``)."""
    if not is_url(shard):
        path = shard.removeprefix("file://")
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(0)
            yield f, size
        return
    with open_url(shard, "rb", storage_options) as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(0)
        yield f, size


#: bytes per read when a shard is copied to local disk
_COPY_CHUNK = 8 << 20


@contextmanager
def fetched_shard(shard: str, storage_options: Mapping[str, Any] | None, scratch: Path) -> Iterator[str]:
    """The shard as a local path for the block: a local shard itself; a URL copied whole into a
    file under ``scratch`` (one sequential read, so the map step can fetch the next shard while
    it computes the current one), removed afterwards. A failed read raises (the executor
    retries the shard); a partial copy is never read."""
    if not is_url(shard):
        yield shard.removeprefix("file://")
        return
    scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="shard-", suffix=".tar", dir=scratch)
    try:
        with os.fdopen(fd, "wb") as dst, open_url(shard, "rb", storage_options) as src:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
        yield name
    finally:
        Path(name).unlink(missing_ok=True)
