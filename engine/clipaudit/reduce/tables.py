"""The reduce step's DuckDB: the ``samples`` view, the ``ok`` rows it aggregates, and a memory
cap beyond which DuckDB spills to the output's temp folder."""

from __future__ import annotations

from pathlib import Path

import duckdb

from clipaudit.io.outputs import OutputLayout
from clipaudit.io.tables import duckdb_views
from clipaudit.spec import REDUCE_MEMORY


def connect(layout: OutputLayout, copies: Path | None = None, memory_limit: str = REDUCE_MEMORY
            ) -> duckdb.DuckDBPyConnection:
    """DuckDB with the ``samples`` view and ``ok``: the ok rows that name an identity — less
    the near-duplicate copies listed in ``copies`` (a ``near_duplicates.parquet``), if given.
    Its memory is capped at ``memory_limit``; larger sorts and aggregations spill to disk."""
    con = duckdb_views(layout, ("samples",))
    # DuckDB makes (and on close removes) the last folder itself, only when it spills
    layout.tmp_dir.mkdir(parents=True, exist_ok=True)
    spill = str(layout.tmp_dir / "duckdb").replace("'", "''")
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = '{spill}'")
    con.execute("SET enable_progress_bar = false")  # the reduce step logs its own progress
    con.execute("SET preserve_insertion_order = false")  # lets results stream; every ordered query says ORDER BY
    skip = ""
    if copies is not None:
        path = str(copies).replace("'", "''")
        skip = (f" AND NOT EXISTS (SELECT 1 FROM read_parquet('{path}') d "
                "WHERE d.shard = samples.shard AND d.position = samples.position)")
    con.execute(f"CREATE VIEW ok AS SELECT * FROM samples WHERE status = 'ok' AND identity IS NOT NULL{skip}")
    return con
