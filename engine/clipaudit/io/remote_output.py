"""An output folder on object storage (``s3://``, ``gs://``, … through fsspec), worked on
through a local mirror.

The store holds the audit; every command works on a local copy of it, the mirror
(``$CLIPAUDIT_MIRROR_DIR/<name>-<hash of the URL>``, default under ``~/.cache/clipaudit/mirrors``),
and syncs: :meth:`RemoteOutput.pull` before reading, :meth:`RemoteOutput.push` after writing.
Every object is written by one PUT of a finished local file, so a reader of the store never
sees half a file. A map actor puts each finished temp file of a shard — its parts, then its
marker — before renaming it into the mirror (:meth:`RemoteOutput.put`), so a marker on the store
always vouches for parts already there, and a file in the mirror is on the store too.

The store is the truth: a pull makes the mirror hold what the store holds — a data part counts
only with its shard's marker beside it — replacing local changes that were not pushed and
removing whatever else the mirror holds (leftovers of another run, a part whose shard failed).
The mirror remembers what it last exchanged with the
store (``.clipaudit-mirror.json``: each file's local size and mtime, the object's size, ETag and
modification time) so a sync moves only what changed; a file whose copy on the store is not
known to be the same (same MD5, where the store gives one) is downloaded, and a file removed
locally (``--force``, a rewritten ``sample_scores/``) is removed from the store by the next
push. Temp files, the DuckDB spill folder and ``_cache/`` stay local.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from clipaudit.io.atomic import atomic_write_json, replace_durably, temp_path
from clipaudit.data.storage import _etag, StorageError, url_to_fs, describe_error

log = logging.getLogger(__name__)

INDEX_NAME = ".clipaudit-mirror.json"
_LOCAL_ONLY = ("_tmp", "_cache")  # top-level folders that are never synced
_LOCAL_ONLY_FILES = (INDEX_NAME, ".clipaudit.lock")
#: pushed last, in this order: markers vouch for parts, the summary and manifest for the run
_LAST = ("_markers/", "_job.json", "_SUMMARY.json", "manifest.json")


def default_mirror_root() -> Path:
    env = os.environ.get("CLIPAUDIT_MIRROR_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "clipaudit" / "mirrors"


def _push_order(rel: str) -> tuple[int, str]:
    for i, prefix in enumerate(_LAST):
        if rel == prefix or rel.startswith(prefix):
            return i + 1, rel
    return 0, rel


def _local_sig(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _remote_sig(info: Mapping[str, Any]) -> list[Any]:
    modified = next((info[k] for k in ("LastModified", "updated", "mtime", "last_modified", "created")
                     if info.get(k) is not None), None)
    if hasattr(modified, "timestamp"):  # S3 lists milliseconds but answers a HEAD in whole seconds
        modified = int(modified.timestamp())
    return [info.get("size"), _etag(info), None if modified is None else str(modified)]


def _same_content(local: Path, info: Mapping[str, Any]) -> bool:
    """Whether the object ``info`` describes holds exactly the bytes of ``local``, as far as the
    store can say: its MD5 (S3's ETag of a single-PUT object, GCS's ``md5Hash``); False when the
    store gives no MD5 (then the caller transfers the file)."""
    if not local.is_file() or local.stat().st_size != info.get("size"):
        return False
    etag = _etag(info)
    hex_md5 = etag if etag and re.fullmatch(r"[0-9a-f]{32}", etag) else None
    b64_md5 = info.get("md5Hash")
    if not (hex_md5 or b64_md5):
        return False
    digest = hashlib.md5()
    with open(local, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == hex_md5 if hex_md5 else base64.b64encode(digest.digest()).decode() == b64_md5


_PART = re.compile(r"^(samples|embeddings)/(?P<stem>[^/]+)\.parquet$")


def _vouched(rel: str, names: set[str]) -> bool:
    """A shard's data part counts only with the shard's marker beside it (a killed actor may
    leave a part it put without the marker that was to follow)."""
    m = _PART.match(rel)
    return m is None or f"_markers/{m['stem']}.done.json" in names


def _synced(rel: str) -> bool:
    """Whether a mirror file (relative POSIX path) belongs on the store."""
    top = rel.split("/", 1)[0]
    name = rel.rsplit("/", 1)[-1]
    return top not in _LOCAL_ONLY and rel not in _LOCAL_ONLY_FILES and ".tmp-" not in name and not name.endswith(".tmp")


@dataclass
class RemoteOutput:
    """The output folder ``url`` on object storage and its local mirror."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold resolved secrets
    mirror: Path = field(default=Path())

    @classmethod
    def for_url(cls, url: str, storage_options: Mapping[str, Any] | None = None,
                mirror_root: Path | None = None) -> RemoteOutput:
        url = url.rstrip("/")
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        tail = url.rsplit("/", 1)[-1] or "output"
        mirror = (mirror_root or default_mirror_root()) / f"{tail[:40]}-{digest}"
        return cls(url, dict(storage_options or {}), mirror)

    def warn_unlocked(self) -> None:
        """What a command that writes here says: the mirror's lock covers this machine only."""
        log.warning("output on object storage (%s): the lock covers this machine only; make sure no other machine "
                    "runs or reduces this audit at the same time", self.url)

    # -- the store -------------------------------------------------------------------
    def _fs(self):
        try:
            fs, root = url_to_fs(self.url, self.storage_options)
        except ImportError as e:
            raise StorageError(f"output {self.url}: {e}") from None
        return fs, root.rstrip("/")

    def _error(self, what: str, e: BaseException, access: str = "read"):
        return StorageError(f"output {what}: {describe_error(self.url, e, access)}")

    def put(self, local: Path, final: Path | None = None) -> None:
        """One PUT of the finished file ``local`` to where ``final`` (default: ``local``, a file
        in the mirror) stands on the store."""
        fs, root = self._fs()
        rel = (final or local).relative_to(self.mirror).as_posix()
        try:
            fs.put_file(str(local), f"{root}/{rel}")
        except FileNotFoundError as e:
            if not local.is_file():
                raise
            raise StorageError(f"output upload of {rel}: the bucket of {self.url} does not exist "
                               f"(create it first): {e}") from e
        except Exception as e:  # noqa: BLE001 — backends raise many types; the shard is retried
            raise self._error(f"upload of {rel}", e, "write") from e

    def remove_quietly(self, *paths: Path) -> None:
        """Remove these mirror files' objects from the store, in this order, without raising (a
        clean-up); stops at the first removal that fails, so a marker listed first is never left
        behind while the parts after it are removed."""
        try:
            fs, root = self._fs()
        except Exception:  # noqa: BLE001 — a clean-up never raises
            return
        for p in paths:
            try:
                fs.rm_file(f"{root}/{p.relative_to(self.mirror).as_posix()}")
            except FileNotFoundError:
                continue
            except Exception as e:  # noqa: BLE001 — see above
                log.warning("could not remove %s from %s: %s", p.relative_to(self.mirror), self.url, e)
                return

    def _listing(self) -> dict[str, Mapping[str, Any]]:
        fs, root = self._fs()
        try:
            fs.invalidate_cache(root)
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:  # noqa: BLE001 — see put
            raise self._error("listing", e) from e
        out = {}
        for name, info in found.items():
            rel = fs._strip_protocol(name)[len(root) + 1:]
            if rel and info.get("type") != "directory" and _synced(rel):
                out[rel] = info
        return out

    # -- the mirror's memory of the last sync -------------------------------------------
    def _load_index(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads((self.mirror / INDEX_NAME).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _save_index(self, index: dict[str, dict[str, Any]]) -> None:

        atomic_write_json(self.mirror / INDEX_NAME, index)

    def _local_files(self) -> dict[str, Path]:
        if not self.mirror.is_dir():
            return {}
        out = {}
        for p in self.mirror.rglob("*"):
            rel = p.relative_to(self.mirror).as_posix()
            if p.is_file() and _synced(rel):
                out[rel] = p
        return out

    # -- sync ------------------------------------------------------------------------
    def pull(self) -> int:
        """Make the mirror hold what the store holds; returns how many files were downloaded.

        A data part without its shard's marker on the store does not count (see
        :func:`_vouched`); a mirror file the store does not hold is removed; a mirror file the
        store holds with the same MD5 (a map actor on this machine wrote and put it) is recorded
        without a download. Hold the layout's lock: a pull rewrites the mirror."""

        self.mirror.mkdir(parents=True, exist_ok=True)
        fs, root = self._fs()
        listing = self._listing()
        names = set(listing)
        remote = {rel: info for rel, info in listing.items() if _vouched(rel, names)}
        index = self._load_index()
        # first what the store does not hold (another run's leftover, a failed shard's part, a
        # removed file), markers before their parts; then the downloads, parts before their marker:
        # an interrupted pull never leaves a marker beside a missing or stale part
        for rel, path in sorted(self._local_files().items(), key=lambda kv: _push_order(kv[0]), reverse=True):
            if rel not in remote:
                path.unlink(missing_ok=True)
        for rel in [r for r in index if r not in remote]:
            del index[rel]
        fetched = 0
        try:
            for rel, info in sorted(remote.items(), key=lambda kv: _push_order(kv[0])):
                local = self.mirror / rel
                sig = _remote_sig(info)
                entry = index.get(rel)
                if local.is_file():
                    if entry is not None and entry["remote"] == sig and entry["local"] == _local_sig(local):
                        continue  # unchanged here and on the store since the last sync
                    if _same_content(local, info):
                        index[rel] = {"local": _local_sig(local), "remote": sig}
                        continue
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp = temp_path(local)
                try:
                    fs.get_file(f"{root}/{rel}", str(tmp))
                except Exception as e:  # noqa: BLE001 — see put
                    tmp.unlink(missing_ok=True)
                    raise self._error(f"download of {rel}", e) from e
                replace_durably(tmp, local)
                index[rel] = {"local": _local_sig(local), "remote": sig}
                fetched += 1
        finally:  # what was fetched stays known, even when a download failed
            self._save_index(index)
        return fetched

    def push(self) -> int:
        """Send the mirror's changes to the store (data first, then markers, the summary and the
        manifest; removals first, markers before their parts); returns how many files were
        uploaded. A data part without its marker in the mirror is not sent (see :func:`_vouched`);
        a file the store already holds with the same MD5 (a map actor put it) is not sent again."""
        fs, root = self._fs()
        index = self._load_index()
        local = self._local_files()
        for rel in sorted((r for r in index if r not in local), key=_push_order, reverse=True):
            try:
                fs.rm_file(f"{root}/{rel}")
            except FileNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001 — see put
                raise self._error(f"removal of {rel}", e, "write") from e
            del index[rel]
        changed = [rel for rel in local if index.get(rel, {}).get("local") != _local_sig(local[rel])]
        listing = self._listing() if any(rel not in index for rel in changed) else {}
        sent = 0
        names = set(local)
        for rel in sorted(changed, key=_push_order):
            if not _vouched(rel, names):
                log.warning("not sending %s to %s: its shard has no marker (the shard is redone on resume)",
                            rel, self.url)
                continue
            sig = _local_sig(local[rel])
            if rel in listing and _same_content(local[rel], listing[rel]):
                index[rel] = {"local": sig, "remote": _remote_sig(listing[rel])}
                continue
            known = index.get(rel, {}).get("remote")
            if known and _same_content(local[rel], {"size": known[0], "ETag": known[1]}):
                index[rel] = {"local": sig, "remote": known}  # rewritten with the same bytes
                continue
            self.put(local[rel])
            try:
                info = fs.info(f"{root}/{rel}")
            except Exception as e:  # noqa: BLE001 — see put
                raise self._error(f"upload of {rel}", e, "write") from e
            index[rel] = {"local": sig, "remote": _remote_sig(info)}
            sent += 1
        self._save_index(index)
        return sent
