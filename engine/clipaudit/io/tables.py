"""An audit's output tables: the one place that knows which tables exist, on local disk or
read straight from object storage (:func:`table_files`), and opens DuckDB over them (the query
sandbox in :mod:`clipaudit.report.query` and the reduce step's capped connection in
:mod:`clipaudit.reduce.tables` start from here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from clipaudit.data.storage import StorageError, describe_error
from clipaudit.io.outputs import RELATIVE, OutputLayout

#: view name → where its rows are, relative to the output root: a Parquet file, or a folder of parts
TABLES = {"samples": RELATIVE.samples_dir, "identities": RELATIVE.identities, "embeddings": RELATIVE.embeddings_dir,
          "sample_scores": RELATIVE.sample_scores_dir, "downloads": RELATIVE.downloads_dir}
#: tables whose parts count only with their shard's marker: a writer killed between a shard's
#: part and its marker leaves a part that resume redoes, and readers must not count it either
VOUCHED = ("samples", "embeddings")


def table_files(fs: Any, root: str, where: str = "", vouched: bool = True) -> dict[str, list[str]]:
    """The output tables under ``root`` on ``fs``, from one listing: view name → its Parquet
    files (sorted). With ``vouched``, a samples or embeddings part only beside its shard's marker
    (on object storage, where several machines put parts and a killed one may leave a part
    without its marker; a local folder's readers glob its parts as they are). ``where`` names the output in errors."""
    try:
        found = fs.find(root)
    except FileNotFoundError:
        found = []
    except Exception as e:  # noqa: BLE001 — storage backends raise many types; said in words
        raise StorageError(f"output listing: {describe_error(where or root, e)}") from e
    rel = {Path(fs._strip_protocol(p)[len(root) + 1:]): p for p in found}
    markers = {r.name.removesuffix(".done.json") for r in rel if r.parent == RELATIVE.markers_dir}
    out: dict[str, list[str]] = {}
    for view, place in TABLES.items():
        if _is_folder(place):
            check = vouched and view in VOUCHED
            files = [p for r, p in rel.items() if r.parent == place and r.suffix == ".parquet"
                     and (not check or r.stem in markers)]
        else:
            files = [p for r, p in rel.items() if r == place]
        if files:
            out[view] = sorted(files)
    return out


def _is_folder(place: Path) -> bool:
    """Whether a table is a folder of Parquet parts (else one Parquet file)."""
    return place.suffix != ".parquet"


def widened(t: pa.DataType) -> pa.DataType:
    """float16 (and lists of it) as float32: DuckDB scans no Arrow float16, its Parquet reader
    gives FLOAT, so views over Arrow datasets keep the types ``read_parquet`` would give."""
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_list(t):
        return pa.list_(widened(t.value_type))
    return t


def arrow_filesystem(fs: Any) -> Any:
    """pyarrow's own S3 client for an s3fs file system whose settings it can take (keys, session
    token, endpoint, region), else ``fs`` itself. Reads then run in pyarrow's C++ threads with no
    Python call per read: faster over many small parts, and no read waits for the GIL — a DuckDB
    scan of a pyarrow dataset over the fsspec file system deadlocked there (seen once in CI: a
    scan thread held the GIL while the fsspec event loop waited for it)."""
    if type(fs).__module__.split(".")[0] != "s3fs":
        return fs
    client = dict(getattr(fs, "client_kwargs", None) or {})
    if (getattr(fs, "anon", False) or getattr(fs, "config_kwargs", None) or getattr(fs, "s3_additional_kwargs", None)
            or getattr(fs, "requester_pays", False) or set(client) - {"region_name", "endpoint_url"}
            or getattr(fs, "kwargs", None) or getattr(fs, "session", None) is not None  # e.g. profile=, a session
            or not getattr(fs, "use_ssl", True)):
        return fs  # settings the native client is not given here: keep s3fs
    from urllib.parse import urlsplit

    from pyarrow.fs import S3FileSystem

    kwargs: dict[str, Any] = {}
    if fs.key and fs.secret:
        kwargs.update(access_key=fs.key, secret_key=fs.secret, session_token=fs.token)
    endpoint = getattr(fs, "endpoint_url", None) or client.get("endpoint_url")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    region = client.get("region_name")
    if region:
        kwargs["region"] = region
    elif not endpoint:
        return fs  # AWS without a region: s3fs finds each bucket's region, pyarrow is not told it
    return S3FileSystem(**kwargs)


def register_datasets(con: duckdb.DuckDBPyConnection, files: dict[str, list[str]], filesystem: Any = None) -> None:
    """A view per table over its Parquet files opened by pyarrow (on ``filesystem``, an fsspec
    file system — S3 read by pyarrow's own client where it can be, see :func:`arrow_filesystem` —
    or local paths): DuckDB itself opens no file."""
    filesystem = None if filesystem is None else arrow_filesystem(filesystem)
    for name, paths in files.items():
        schema = ds.dataset(paths, format="parquet", filesystem=filesystem).schema
        schema = pa.schema([f.with_type(widened(f.type)) for f in schema], metadata=schema.metadata)
        con.register(name, ds.dataset(paths, format="parquet", schema=schema, filesystem=filesystem))


def output_views(layout: OutputLayout) -> dict[str, Path]:
    """The output tables present in a local folder: view name → Parquet file or glob (``samples``
    always: an audit without parts is an error its readers name)."""
    views: dict[str, Path] = {}
    for view, place in TABLES.items():
        path = layout.root / place
        if not _is_folder(place):
            if path.is_file():
                views[view] = path
        elif view == "samples" or (path.is_dir() and any(path.glob("*.parquet"))):
            views[view] = path / "*.parquet"
    return views


def duckdb_views(layout: OutputLayout, names: tuple[str, ...] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with a view per output table (all present ones, or ``names``); an
    output URL's tables are read straight from its store (vouched parts only)."""
    con = duckdb.connect(":memory:")
    store = layout.store
    if store.remote:
        files = table_files(store.fs, store.root, store.where, vouched=True)
        register_datasets(con, {k: v for k, v in files.items() if names is None or k in names}, store.fs)
        return con
    for name, pattern in output_views(layout).items():
        if names is None or name in names:
            quoted = str(pattern).replace("'", "''")
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{quoted}')")
    return con
