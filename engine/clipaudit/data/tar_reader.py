"""Stream samples out of a WebDataset tar, accounting for every one of them.

Files of one sample share a key (the member name up to the first dot of its basename)
and stand next to each other in the tar, as img2dataset writes them. Nothing is ever
written to disk, so member names with ``..`` or absolute paths are harmless keys.

Failures never vanish: a key that repeats inside the shard, a sample cut by a truncated
tar, and a file that is not a tar at all each come out as a :class:`RawSample` with an
``error`` code, so the mapper turns them into error rows. An I/O error while reading (EIO,
a timeout, an object store that hung up) is not a property of the data: it propagates, so
the executor retries the whole shard instead of recording its remaining samples as cut.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Mapping

from clipaudit.data.shards import open_shard

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawSample:
    """One sample's files as bytes, or the reason it cannot be read."""

    key: str | None
    position: int  # index of the sample within its shard, counting error samples
    files: dict[str, bytes] = field(default_factory=dict)  # extension → bytes
    error: str | None = None
    detail: str | None = None


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.seg.jpg`` → (``dir/abc``, ``seg.jpg``), webdataset's convention."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext.lower() if dot else ""


class _Grouper:
    """Groups consecutive members into samples and numbers them."""

    def __init__(self) -> None:
        self.current: RawSample | None = None
        self.position = 0
        self.seen: set[str] = set()

    def add(self, key: str, ext: str, data: bytes) -> RawSample | None:
        cur = self.current
        if cur is not None and cur.key == key and ext not in cur.files:
            cur.files[ext] = data
            return None
        done = self.close()
        self.current = RawSample(key=key, position=self.position, files={ext: data})
        self.position += 1
        if key in self.seen:
            self.current.error = "duplicate_key"
            self.current.detail = f"key {key!r} appears more than once in this shard"
        self.seen.add(key)
        return done

    def close(self) -> RawSample | None:
        done, self.current = self.current, None
        return done


def _end_is_clean(f, offset: int) -> bool:
    """A tar ends with a zero block where the next header would be."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


def iter_tar_samples(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> Iterator[RawSample]:
    """Yield every sample of a tar shard (local path or URL), including error samples.

    A shard that cannot be opened at all (missing, no permission, network) raises: the
    executor retries it and reports it when it keeps failing.
    """
    with open_shard(str(path), storage_options) as (f, size):
        yield from _samples(f, size)


def _samples(f, size: int) -> Iterator[RawSample]:
    g = _Grouper()
    try:
        tf = tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as e:
        code = "empty_shard" if size == 0 else "not_a_tar"
        yield RawSample(key=None, position=0, error=code, detail=f"cannot open tar: {e}")
        return
    with tf:
        while True:
            try:
                member = tf.next()
            except tarfile.TarError as e:
                if (s := g.close()) is not None:
                    yield s
                yield RawSample(key=None, position=g.position, error="truncated_tar", detail=str(e))
                return
            if member is None:
                break
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            try:
                fobj = tf.extractfile(member)
                data = fobj.read() if fobj is not None else b""
            except (tarfile.TarError, EOFError) as e:  # the bytes end early: a cut tar (OSError propagates)
                done = g.add(key, ext, b"")
                if done is not None:
                    yield done
                cut = g.close()
                assert cut is not None
                cut.files.pop(ext, None)
                cut.error, cut.detail = "truncated_tar", f"{member.name}: {e}"
                yield cut
                return
            done = g.add(key, ext, data)
            if done is not None:
                yield done
        offset = tf.offset
    last = g.close()
    if _end_is_clean(f, offset):
        if last is not None:
            yield last
        elif g.position == 0:  # a well-formed tar without a single sample: one row says so
            yield RawSample(key=None, position=0, error="empty_shard",
                            detail="the tar holds no samples (img2dataset writes one when every download of the "
                                   "shard failed)")
        return
    # tarfile stops quietly at a cut header: the last sample may be incomplete.
    if last is not None:
        last.error = last.error or "truncated_tar"
        last.detail = last.detail or "the tar ends without an end-of-archive block; this sample may be cut"
        yield last
    else:
        yield RawSample(key=None, position=g.position, error="truncated_tar",
                        detail="tar ends without end-of-archive block")
