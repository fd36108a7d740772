"""The reduce step's DuckDB: the ``samples`` view, the ``ok`` rows it aggregates, and a memory
cap beyond which DuckDB spills to the output's temp folder."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from clipaudit.io.outputs import OutputLayout
from clipaudit.io.tables import duckdb_views
from clipaudit.spec import REDUCE_MEMORY


def connect(layout: OutputLayout, copies: Path | None = None, memory_limit: str = REDUCE_MEMORY,
            tables: tuple[str, ...] = ("samples",)) -> duckdb.DuckDBPyConnection:
    """DuckDB with the ``samples`` view (and the other ``tables``) and ``ok``: the ok rows that
    name an identity — less the near-duplicate copies listed in ``copies`` (the output's
    ``near_duplicates.parquet``), if given. Its memory is capped at ``memory_limit``; larger
    sorts and aggregations spill to a local temp folder."""
    con = duckdb_views(layout, tables)
    # DuckDB makes (and on close removes) the last folder itself, only when it spills
    layout.tmp_dir.mkdir(parents=True, exist_ok=True)
    spill = str(layout.tmp_dir / "duckdb").replace("'", "''")
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = '{spill}'")
    con.execute("SET enable_progress_bar = false")  # the reduce step logs its own progress
    con.execute("SET preserve_insertion_order = false")  # lets results stream; every ordered query says ORDER BY
    skip = ""
    if copies is not None:  # one row per copy: read through the store, held by DuckDB in memory
        with layout.store.open(copies) as f:
            con.register("near_duplicate_copies", pq.read_table(f, columns=["shard", "position"]))
        skip = (" AND NOT EXISTS (SELECT 1 FROM near_duplicate_copies d "
                "WHERE d.shard = samples.shard AND d.position = samples.position)")
    con.execute(f"CREATE VIEW ok AS SELECT * FROM samples WHERE status = 'ok' AND identity IS NOT NULL{skip}")
    return con
