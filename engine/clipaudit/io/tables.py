"""An audit's output tables as DuckDB views: the one place that knows which tables exist and
opens DuckDB over them (the query sandbox in :mod:`clipaudit.report.query` and the reduce step's
capped connection in :mod:`clipaudit.reduce.tables` start from here)."""

from __future__ import annotations

from pathlib import Path

import duckdb

from clipaudit.io.outputs import OutputLayout


def output_views(layout: OutputLayout) -> dict[str, Path]:
    """The output tables present in ``layout``: view name → Parquet file or glob."""
    views: dict[str, Path] = {"samples": layout.samples_dir / "*.parquet"}
    if layout.identities.is_file():
        views["identities"] = layout.identities
    for name, folder in (("embeddings", layout.embeddings_dir), ("sample_scores", layout.sample_scores_dir),
                         ("downloads", layout.downloads_dir)):
        if folder.is_dir() and any(folder.glob("*.parquet")):
            views[name] = folder / "*.parquet"
    return views


def duckdb_views(layout: OutputLayout, names: tuple[str, ...] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with a view per output table (all present ones, or ``names``)."""
    con = duckdb.connect(":memory:")
    for name, pattern in output_views(layout).items():
        if names is None or name in names:
            quoted = str(pattern).replace("'", "''")
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{quoted}')")
    return con
