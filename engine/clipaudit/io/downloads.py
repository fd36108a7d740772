"""img2dataset's per-URL status rows as the audit's ``downloads`` table.

Beside each ``NNNNN.tar`` img2dataset writes ``NNNNN.parquet``: one row per URL of the shard
with its sample key, ``status`` (``success``, ``failed_to_download``, ``failed_to_resize``) and
``error_message``. A URL that failed has no sample in the tar, so the map step never sees it;
these rows are how the audit still accounts for it. Each shard's rows are copied to
``downloads/<part>.parquet`` (redone when the source file changes) and counted in
``_SUMMARY.json`` as missing inputs, by img2dataset's reason.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from clipaudit.data.samples import normalize_name
from clipaudit.data.urls import is_url
from clipaudit.io.outputs import OutputLayout
from clipaudit.contract.schemas import load_schema
from clipaudit.data.storage import url_to_fs, open_url

log = logging.getLogger(__name__)

#: the columns that make a Parquet file img2dataset's status file
STATUS_COLUMNS = ("url", "key", "status", "error_message")
#: reasons listed by name in ``_SUMMARY.json``; rarer ones are summed under ``OTHER``
MAX_REASONS = 50
OTHER = "(other reasons)"
_META = b"clipaudit.downloads"


def status_file(shard: str) -> str | None:
    """Where img2dataset puts the status rows of ``shard`` (``x.tar`` → ``x.parquet``)."""
    return shard[: -len(".tar")] + ".parquet" if shard.endswith(".tar") else None


def _signatures(paths: list[str], storage_options: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Size and modification time of each file of ``paths`` that exists (a URL is read with the
    job's ``data.storage_options``): local files by ``stat``, files on object storage from one
    listing of each folder (not a request per shard)."""
    out: dict[str, dict[str, Any]] = {}
    folders: dict[str, list[str]] = {}
    for path in paths:
        if not is_url(path):
            try:
                st = Path(path.removeprefix("file://")).stat()
            except FileNotFoundError:
                continue
            out[path] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        else:
            folders.setdefault(path.rsplit("/", 1)[0], []).append(path)
    for folder, wanted in folders.items():
        try:
            fs, root = url_to_fs(folder, storage_options)
            found = fs.find(root, maxdepth=1, detail=True)
            listed = {p.rstrip("/").rsplit("/", 1)[-1]: info for p, info in found.items()}
        except FileNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001 — backends raise many types; the audit goes on without these rows
            log.warning("downloads: cannot list %s (%s: %s); its shards' failed URLs are not counted", folder,
                        type(e).__name__, e)
            continue
        for path in wanted:
            info = listed.get(path.rsplit("/", 1)[-1])
            if info is not None and info.get("type") != "directory":
                out[path] = {"bytes": info.get("size"),
                             "mtime": str(info.get("mtime") or info.get("LastModified") or "")}
    return out


def _read_status(path: str, identity_field: str, storage_options: Mapping[str, Any] | None = None
                 ) -> pa.Table | None:
    """img2dataset's status rows of one shard, or None when the file is not such a file."""
    if is_url(path):
        with open_url(path, "rb", storage_options) as f:
            return _status_table(pq.ParquetFile(f), identity_field)
    return _status_table(pq.ParquetFile(path.removeprefix("file://")), identity_field)


def _status_table(pf: pq.ParquetFile, identity_field: str) -> pa.Table | None:
    names = pf.schema_arrow.names
    if not set(STATUS_COLUMNS) <= set(names):
        return None
    wanted = list(STATUS_COLUMNS) + ([identity_field] if identity_field in names else [])
    return pf.read(columns=wanted)


def _as_strings(column: pa.ChunkedArray) -> list[str | None]:
    return [None if v is None else str(v) for v in column.to_pylist()]


def _downloads_table(shard: str, status: pa.Table, identity_field: str) -> pa.Table:
    n = status.num_rows
    if identity_field in status.column_names:
        identities = [None if v is None else (normalize_name(v) or None) for v in _as_strings(status[identity_field])]
    else:
        identities = [None] * n
    columns = {"shard": [shard] * n, "url": _as_strings(status["url"]), "identity": identities,
               "key": _as_strings(status["key"]), "status": _as_strings(status["status"]),
               "error": _as_strings(status["error_message"])}
    return pa.Table.from_pydict(columns, schema=load_schema("downloads"))


def _counts(table: pa.Table) -> dict[str, Any]:
    statuses = table["status"].to_pylist()
    reasons = Counter(e or s or "unknown" for s, e in zip(statuses, table["error"].to_pylist()) if s != "success")
    by_status = Counter(s or "unknown" for s in statuses if s != "success")
    return {"urls": table.num_rows, "success": table.num_rows - sum(by_status.values()),
            "missing": sum(by_status.values()), "by_status": dict(by_status), "by_reason": dict(reasons)}


def _stored(layout: OutputLayout, part: Path) -> dict[str, Any] | None:
    try:
        with layout.store.open(part) as f:
            meta = pq.read_schema(f).metadata or {}
        return json.loads(meta[_META])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def shard_downloads(layout: OutputLayout, shard: str, identity_field: str, signature: dict[str, Any] | None,
                    copied: bool, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Copy ``shard``'s status rows to ``downloads/`` (unless the copy is current) and return
    their counts; None when the shard has no img2dataset status file. ``signature``: its status
    file's (None: there is none); ``copied``: whether ``downloads/`` holds a copy of it."""
    source = status_file(shard)
    part = layout.download_part(shard)
    if signature is None or source is None:
        if copied:
            layout.store.remove(part)  # a copy of a status file that is gone is no longer evidence
        return None
    wanted = {"shard": shard, "source": source, "signature": signature, "identity_field": identity_field}
    stored = _stored(layout, part) if copied else None
    if stored is not None and {k: stored.get(k) for k in wanted} == wanted:
        return stored["counts"]
    status = _read_status(source, identity_field, storage_options)
    if status is None:
        log.info("downloads: %s is not an img2dataset status file (no %s columns)", source, ", ".join(STATUS_COLUMNS))
        if copied:
            layout.store.remove(part)
        return None
    table = _downloads_table(shard, status, identity_field)
    counts = _counts(table)
    meta = dict(table.schema.metadata or {})
    meta[_META] = json.dumps({**wanted, "counts": counts}).encode()
    layout.write_table(part, table.replace_schema_metadata(meta))
    return counts


def _capped(counter: Counter) -> dict[str, int]:
    top = counter.most_common(MAX_REASONS)
    rest = sum(counter.values()) - sum(n for _, n in top)
    return dict(top + ([(OTHER, rest)] if rest else []))


def collect_downloads(layout: OutputLayout, shards: list[str], identity_field: str,
                      storage_options: Mapping[str, Any] | None = None
                      ) -> tuple[dict[str, Any] | None, dict[str, dict[str, int]]]:
    """The ``downloads`` block of ``_SUMMARY.json`` (None when no shard has a status file) and
    per shard its URL and missing counts."""
    totals: Counter = Counter()
    by_status: Counter = Counter()
    by_reason: Counter = Counter()
    per_shard: dict[str, dict[str, int]] = {}
    sources = {shard: status_file(shard) for shard in shards}
    signatures = _signatures([s for s in sources.values() if s], storage_options)
    copies = layout.store.files(layout.downloads_dir)  # one listing
    for shard in shards:
        source = sources[shard]
        c = shard_downloads(layout, shard, identity_field, signatures.get(source) if source else None,
                            layout.download_part(shard) in copies, storage_options)
        if c is None:
            continue
        per_shard[shard] = {"urls": c["urls"], "missing": c["missing"]}
        totals.update({"urls": c["urls"], "success": c["success"], "missing": c["missing"]})
        by_status.update(c["by_status"])
        by_reason.update(c["by_reason"])
    if not per_shard:
        return None, {}
    block = {"shards_with_status": len(per_shard), "urls": totals["urls"], "success": totals["success"],
             "missing": totals["missing"], "missing_by_status": dict(sorted(by_status.items())),
             "missing_by_reason": _capped(by_reason)}
    return block, per_shard
