"""An output folder on object storage (``s3://``, ``gs://``, … through fsspec), worked on
through a local mirror.

The store holds the audit; every command works on a local copy of it, the mirror
(``$CLIPAUDIT_MIRROR_DIR/<hash of the URL>``, default under ``~/.cache/clipaudit/mirrors``),
and syncs: :meth:`RemoteOutput.pull` before reading, :meth:`RemoteOutput.push` after writing.
Every object is written by one PUT of a finished local file, so a reader of the store never
sees half a file. A map actor puts a shard's parts and then its marker
(:meth:`RemoteOutput.put`), so a marker on the store always vouches for parts already there.

The mirror remembers what it last exchanged with the store (``.clipaudit-mirror.json``: each
file's local size and mtime, the object's size and ETag) so a sync moves only what changed,
and a file removed locally (``--force``, a rewritten ``sample_scores/``) is removed from the
store by the next push. Temp files, the DuckDB spill folder and ``_cache/`` stay local.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

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
    from ..data.storage import _etag

    return [info.get("size"), _etag(info)]


def _synced(rel: str) -> bool:
    """Whether a mirror file (relative POSIX path) belongs on the store."""
    top = rel.split("/", 1)[0]
    name = rel.rsplit("/", 1)[-1]
    return top not in _LOCAL_ONLY and rel not in _LOCAL_ONLY_FILES and ".tmp-" not in name


@dataclass
class RemoteOutput:
    """The output folder ``url`` on object storage and its local mirror."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    mirror: Path = field(default=Path())

    @classmethod
    def for_url(cls, url: str, storage_options: Mapping[str, Any] | None = None,
                mirror_root: Path | None = None) -> "RemoteOutput":
        url = url.rstrip("/")
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        tail = url.rsplit("/", 1)[-1] or "output"
        mirror = (mirror_root or default_mirror_root()) / f"{tail[:40]}-{digest}"
        return cls(url, dict(storage_options or {}), mirror)

    # -- the store -------------------------------------------------------------------
    def _fs(self):
        from ..data.storage import StorageError, url_to_fs

        try:
            fs, root = url_to_fs(self.url, self.storage_options)
        except ImportError as e:
            raise StorageError(f"output {self.url}: {e}") from None
        return fs, root.rstrip("/")

    def _error(self, what: str, e: BaseException, access: str = "read"):
        from ..data.storage import StorageError, describe_error

        return StorageError(f"output {what}: {describe_error(self.url, e, access)}")

    def put(self, local: Path) -> None:
        """One PUT of the finished mirror file ``local`` to its place on the store."""
        fs, root = self._fs()
        rel = local.relative_to(self.mirror).as_posix()
        try:
            fs.put_file(str(local), f"{root}/{rel}")
        except Exception as e:  # noqa: BLE001 — backends raise many types; the shard is retried
            raise self._error(f"upload of {rel}", e, "write") from e

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
        from .outputs import atomic_write_json

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
        """Bring the mirror up to date with the store; returns how many files were downloaded.

        A file the store no longer has (another run's ``--force``) is removed here; a local file
        the store has at the same size but this mirror never exchanged (a map actor on this
        machine wrote and put it) is recorded without a download."""
        from .outputs import _replace_durably, _tmp_path

        self.mirror.mkdir(parents=True, exist_ok=True)
        fs, root = self._fs()
        remote = self._listing()
        index = self._load_index()
        fetched = 0
        for rel, info in sorted(remote.items()):
            local = self.mirror / rel
            sig = _remote_sig(info)
            entry = index.get(rel)
            if local.is_file():
                if entry is not None and entry["remote"] == sig:
                    continue  # unchanged on the store (a local change is pushed later)
                if entry is None and local.stat().st_size == info.get("size"):
                    index[rel] = {"local": _local_sig(local), "remote": sig}
                    continue
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_path(local)
            try:
                fs.get_file(f"{root}/{rel}", str(tmp))
            except Exception as e:  # noqa: BLE001 — see put
                tmp.unlink(missing_ok=True)
                raise self._error(f"download of {rel}", e) from e
            _replace_durably(tmp, local)
            index[rel] = {"local": _local_sig(local), "remote": sig}
            fetched += 1
        for rel in [r for r in index if r not in remote]:
            (self.mirror / rel).unlink(missing_ok=True)
            del index[rel]
        self._save_index(index)
        return fetched

    def push(self) -> int:
        """Send the mirror's changes to the store (data first, then markers, the summary and the
        manifest; removals first); returns how many files were uploaded."""
        fs, root = self._fs()
        index = self._load_index()
        local = self._local_files()
        for rel in [r for r in index if r not in local]:
            try:
                fs.rm_file(f"{root}/{rel}")
            except FileNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001 — see put
                raise self._error(f"removal of {rel}", e, "write") from e
            del index[rel]
        sent = 0
        for rel in sorted(local, key=_push_order):
            sig = _local_sig(local[rel])
            if index.get(rel, {}).get("local") == sig:
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
