"""SQL over an audit's outputs with DuckDB: views ``samples``, ``identities``, ``embeddings``,
``sample_scores``, ``downloads`` (each where present).

Only read statements are accepted (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN), and
the connection that runs them has no file or network access of its own: DuckDB reads the
output tables through Arrow datasets that Python opened, so a query can neither write a file
(not even through ``EXPLAIN ANALYZE COPY``) nor read one outside the audit.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import duckdb
import pyarrow as pa

from clipaudit.core.errors import ClipauditError
from clipaudit.app.audit import Audit
from clipaudit.io.outputs import no_audit
from clipaudit.io.tables import register_datasets

_READ_ONLY_TYPES = {"SELECT", "EXPLAIN"}


class QueryError(ClipauditError, ValueError):
    """A query that cannot run against these outputs."""


def sealed_views(files: dict[str, list[str]], filesystem: Any = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with a view per output table (``files``: view → its Parquet files, on
    ``filesystem``, an fsspec file system, or local paths) that can touch no file, URL or setting.

    ``read_parquet`` views are bound again at every query, so they would need the folder in
    ``allowed_directories``, and that lets ``EXPLAIN ANALYZE COPY … TO`` write into it. Here the
    files are listed and opened by pyarrow instead — on object storage straight from the store —
    and DuckDB's own access is switched off.
    """
    con = duckdb.connect(":memory:")
    register_datasets(con, files, filesystem)
    for setting in ("enable_external_access = false", "autoinstall_known_extensions = false",
                    "autoload_known_extensions = false", "python_enable_replacements = false",
                    "lock_configuration = true"):  # last: nothing can be set back
        con.execute(f"SET {setting}")
    return con


def connect(output: str | Path, storage_options: Mapping[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with sealed views over an output folder, or over an output URL read
    straight from the store (nothing is copied to local disk; see :func:`sealed_views`)."""
    audit = Audit.open(output, storage_options)
    files = audit.tables()
    if "samples" not in files:
        raise QueryError(no_audit(output, "samples/*.parquet"))
    try:
        return sealed_views(files, audit.fs if audit.remote else None)
    except (OSError, pa.ArrowException) as e:
        raise QueryError(f"cannot open the outputs in {output}: {_one_line(str(e))}") from None


def _one_line(message: str) -> str:
    """DuckDB's message on one line: its ``LINE 1: …`` context kept, the caret line dropped."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip().strip("^")]
    if len(lines) <= 1:
        return message.strip()
    return f"{lines[0]} ({'; '.join(lines[1:])})"


def _check_read_only(sql: str) -> None:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(f"cannot parse SQL: {_one_line(str(e))}") from None
    if not statements:
        raise QueryError("empty query")
    for st in statements:
        kind = str(st.type).split(".")[-1]
        if kind not in _READ_ONLY_TYPES:
            raise QueryError(f"only read queries are allowed (got a {kind} statement)")
    if len(statements) > 1:  # only the last one's result would be shown
        raise QueryError(f"one statement per query, got {len(statements)}: run them one at a time")


def run_query(output: str | Path, sql: str, storage_options: Mapping[str, Any] | None = None
              ) -> tuple[list[str], list[tuple]]:
    """Run a read-only query over an output folder or URL; return (column names, rows)."""
    _check_read_only(sql)
    con = connect(output, storage_options)
    try:
        cur = con.execute(sql)
        return [d[0] for d in cur.description], cur.fetchall()
    except duckdb.PermissionException as e:
        raise QueryError(f"a query may only read the audit's own views: {_one_line(str(e))}") from None
    except duckdb.Error as e:
        raise QueryError(_one_line(str(e))) from None
    finally:
        con.close()


def _cell(v: Any, width: int = 60) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    text = str(v)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(columns: list[str], rows: list[tuple], max_rows: int = 100) -> str:
    shown = [[_cell(v) for v in r] for r in rows[:max_rows]]
    widths = [max([len(c)] + [len(r[i]) for r in shown]) for i, c in enumerate(columns)]
    line = "-+-".join("-" * w for w in widths)
    out = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), line]
    out += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in shown]
    more = f" (showing {max_rows})" if len(rows) > max_rows else ""
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''}{more})")
    return "\n".join(out)


def format_csv(columns: list[str], rows: list[tuple]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows([[("" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v) for v in r] for r in rows])
    return buf.getvalue()


def format_json(columns: list[str], rows: list[tuple]) -> str:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        return v

    return json.dumps([{c: clean(v) for c, v in zip(columns, r)} for r in rows], indent=2, default=str)


FORMATTERS = {"table": format_table, "csv": format_csv, "json": format_json}
