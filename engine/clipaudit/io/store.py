"""Where an output's files live: a local folder, or an output URL (``s3://``, ``gs://``, …) on
object storage through fsspec, behind one interface.

Code names an output's files by local paths under a base folder (:class:`OutputLayout`'s
``root``); the store maps each path to its place on the output's file system and does every
read, listing, write and removal there. A finished file is written locally to a temp file and
then published in one step: on local disk fsynced and renamed into place (the folder fsynced
too), on object storage one upload of the whole file — an object appears only when its upload
completes, so a reader never sees half a file, and a file published after another (a shard's
marker after its parts) is never seen before it. Nothing is copied from the store to local disk;
for an output URL the base folder is a local scratch folder that holds only temp files, DuckDB's
spill and the lock file (``$CLIPAUDIT_SCRATCH_DIR``, default under the system's temp folder; the
node's copy of the name state goes under it too, see :mod:`clipaudit.map.state`).

One writer at a time: an output URL has no lock that spans machines, so only one run or reduce
may write to it at once (the local lock covers one machine; see :meth:`Store.warn_single_writer`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import fsspec

from clipaudit.data.storage import StorageError, describe_error, url_to_fs
from clipaudit.io.atomic import fsync_file, replace_durably, temp_path

log = logging.getLogger(__name__)

#: environment variable naming the local folder under which an output URL's scratch folders go
SCRATCH_ENV = "CLIPAUDIT_SCRATCH_DIR"


def scratch_root() -> Path:
    env = os.environ.get(SCRATCH_ENV)
    return Path(env).expanduser() if env else Path(tempfile.gettempdir()) / "clipaudit-scratch"


@dataclass(frozen=True)
class Store:
    """The files of one output: ``base`` (a local path) stands for ``root`` on ``fs``; ``url`` is
    the output URL, None for a local folder (then ``base`` is the folder itself, ``fs`` the local
    file system, and writes are renames on disk)."""

    base: Path
    url: str | None = None
    fs: Any = field(default=None, repr=False, compare=False)
    root: str = ""

    @classmethod
    def local(cls, folder: Path) -> Store:
        """The store of a local folder (its fsspec file system serves readers such as ``query``)."""
        return cls(folder, None, fsspec.filesystem("file"), str(Path(folder).resolve()))

    @classmethod
    def for_url(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> Store:
        """The store of an output URL (its file system is opened here; nothing is contacted)."""
        url = url.rstrip("/")
        try:
            fs, root = url_to_fs(url, storage_options)
        except ImportError as e:
            raise StorageError(f"output {url}: {e}") from None
        tail = url.rsplit("/", 1)[-1] or "output"
        base = scratch_root() / f"{tail[:40]}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
        return cls(base, url, fs, root.rstrip("/"))

    @property
    def remote(self) -> bool:
        return self.url is not None

    @property
    def where(self) -> str:
        """The output as users name it (the URL, or the folder)."""
        return self.url or str(self.base)

    def location(self, path: Path) -> str:
        """Where ``path`` is, as users name it: the local path, or the output URL and the file in it."""
        if not self.remote:
            return str(path)
        return f"{self.url}/{Path(path).relative_to(self.base).as_posix()}"

    def key(self, path: Path) -> str:
        """Where the output file ``path`` (under ``base``) is on the store."""
        rel = Path(path).relative_to(self.base).as_posix()
        return self.root if rel == "." else f"{self.root}/{rel}"

    def _path(self, key: str) -> Path:
        return self.base / self.fs._strip_protocol(key)[len(self.root) + 1:]

    def _error(self, what: str, path: Path, e: BaseException, access: str = "read") -> StorageError:
        rel = Path(path).relative_to(self.base).as_posix()
        return StorageError(f"output {what} of {rel}: {describe_error(self.url or '', e, access)}")

    def warn_single_writer(self) -> None:
        if self.remote:
            log.warning("output on object storage (%s): the lock covers this machine only; make sure no other "
                        "machine runs or reduces this audit at the same time", self.url)

    # -- writes --------------------------------------------------------------------------
    def publish(self, tmp: Path, path: Path) -> None:
        """Put the finished, fsynced local file ``tmp`` where ``path`` stands: renamed into place on
        local disk, one upload on object storage (then ``tmp`` is removed). A failed upload
        removes ``tmp`` and raises :class:`StorageError` (the caller retries the shard or step)."""
        if not self.remote:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_durably(tmp, path)
            return
        try:
            self.fs.put_file(str(tmp), self.key(path))
        except FileNotFoundError as e:
            if not tmp.is_file():
                raise
            raise StorageError(f"output upload of {path.relative_to(self.base).as_posix()}: the bucket of "
                               f"{self.url} does not exist (create it first): {e}") from e
        except Exception as e:  # noqa: BLE001 — backends raise many types; said in words, the step is retried
            raise self._error("upload", path, e, "write") from e
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self, *paths: Path, quiet: bool = False) -> None:
        """Remove these files, in this order (a marker listed before its parts is never left
        behind them); ``quiet``: a clean-up that logs a failure instead of raising, and stops."""
        for p in paths:
            try:
                if self.remote:
                    self.fs.rm_file(self.key(p))
                else:
                    p.unlink(missing_ok=True)
            except FileNotFoundError:
                continue
            except Exception as e:  # noqa: BLE001 — see publish
                if not quiet:
                    raise self._error("removal", p, e, "write") from e
                log.warning("could not remove %s from %s: %s", p.relative_to(self.base), self.where, e)
                return

    def remove_tree(self, folder: Path) -> None:
        """Remove a folder and everything in it (absent: nothing to do)."""
        if not self.remote:
            shutil.rmtree(folder, ignore_errors=True)
            return
        try:
            self.fs.rm(self.key(folder), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 — see publish
            raise self._error("removal", folder, e, "write") from e

    # -- reads ---------------------------------------------------------------------------
    def is_file(self, path: Path) -> bool:
        if not self.remote:
            return path.is_file()
        try:
            return bool(self.fs.isfile(self.key(path)))
        except Exception as e:  # noqa: BLE001 — see publish
            raise self._error("check", path, e) from e

    def read_bytes(self, path: Path) -> bytes:
        """The file's bytes; FileNotFoundError where there is none."""
        if not self.remote:
            return path.read_bytes()
        try:
            return self.fs.cat_file(self.key(path))
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 — see publish
            raise self._error("read", path, e) from e

    def read_json(self, path: Path) -> Any | None:
        """A JSON file's content; None where there is none or it does not parse."""
        try:
            return json.loads(self.read_bytes(path))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def read_many(self, paths: list[Path]) -> dict[Path, bytes]:
        """The bytes of these files, those that exist (on object storage in concurrent requests)."""
        if not self.remote:
            out = {}
            for p in paths:
                try:
                    out[p] = p.read_bytes()
                except FileNotFoundError:
                    continue
            return out
        if not paths:
            return {}
        keys = {self.key(p): p for p in paths}
        try:
            got = self.fs.cat(list(keys), on_error="omit")
        except Exception as e:  # noqa: BLE001 — see publish
            raise self._error("read", paths[0], e) from e
        return {self._path(k): v for k, v in got.items() if not isinstance(v, BaseException)}

    def download(self, path: Path, dest: Path) -> None:
        """Copy the file ``path`` to the local file ``dest``, which appears only once complete (a
        temp name beside it, then a rename); FileNotFoundError where there is none."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(dest)
        try:
            if self.remote:
                self.fs.get_file(self.key(path), str(tmp))
            else:
                shutil.copyfile(path, tmp)
            fsync_file(tmp)
            replace_durably(tmp, dest)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 — see publish
            raise self._error("download", path, e) from e
        finally:
            tmp.unlink(missing_ok=True)

    def open(self, path: Path):
        """A binary file object for reading (pyarrow reads Parquet footers and parts through it)."""
        if not self.remote:
            return open(path, "rb")
        return self.fs.open(self.key(path), "rb")

    def files(self, folder: Path | None = None) -> dict[Path, int]:
        """Every file under ``folder`` (default: the whole output) with its size, from one listing."""
        folder = self.base if folder is None else folder
        if not self.remote:
            if not folder.is_dir():
                return {}
            return {p: p.stat().st_size for p in folder.rglob("*") if p.is_file()}
        try:
            self.fs.invalidate_cache(self.key(folder))
            found = self.fs.find(self.key(folder), detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:  # noqa: BLE001 — see publish
            raise self._error("listing", folder, e) from e
        return {self._path(k): int(info.get("size") or 0) for k, info in found.items()
                if info.get("type") != "directory"}

    def glob(self, folder: Path, suffix: str = ".parquet") -> list[Path]:
        """The files directly in ``folder`` whose names end with ``suffix``, sorted."""
        if not self.remote:
            return sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []
        return sorted(p for p in self.files(folder) if p.parent == folder and p.name.endswith(suffix))

    def arrow(self, paths: list[Path]) -> tuple[list[str], Any]:
        """(sources, filesystem) for pyarrow's readers: local paths and no file system, or the
        store's keys and its fsspec file system."""
        if not self.remote:
            return [str(p) for p in paths], None
        return [self.key(p) for p in paths], self.fs
