"""The reduce step: Parquet parts → identities.parquet (+ metrics.json with labels).

Reads only the outputs (no model, no GPU), so it can be re-run with another ``tau`` or
labels file. Aggregation runs in DuckDB, which streams over the parts.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from .attacks import caption, idia
from .attacks.idia import load_name_pool
from .data.samples import normalize_name
from .metrics import membership_metrics
from .outputs import OutputLayout, atomic_write_json, atomic_write_table, load_schema

log = logging.getLogger(__name__)

IDENTITIES_SCHEMA = load_schema("identities")
_TRUE = {"true", "1", "yes", "y", "t", "member"}
_FALSE = {"false", "0", "no", "n", "f", "nonmember", "non-member"}


class LabelsError(ValueError):
    """The labels file cannot be read; the message names the line."""


@dataclass(frozen=True)
class ReduceOptions:
    tau: int = 1
    labels: Path | None = None
    names: Path | None = None
    idia: bool = True
    caption: bool = True


def read_identity_labels(path: Path) -> dict[str, bool]:
    """``identity,member`` rows (true/false, 1/0, yes/no). Other columns are ignored."""
    out: dict[str, bool] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"identity", "member"} <= set(reader.fieldnames):
            raise LabelsError(f"labels: {path} needs a header with columns identity,member")
        for line_no, row in enumerate(reader, start=2):
            ident = normalize_name(row.get("identity") or "")
            if not ident:
                continue
            value = (row.get("member") or "").strip().lower()
            if value not in _TRUE | _FALSE:
                raise LabelsError(f"labels: {path} line {line_no}: member must be true/false, got {row.get('member')!r}")
            out[ident] = value in _TRUE
    return out


def _samples_relation(con: duckdb.DuckDBPyConnection, layout: OutputLayout) -> None:
    parts = str(layout.samples_dir / "*.parquet")
    con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet('{_sql_str(parts)}')")
    con.execute("CREATE VIEW ok AS SELECT * FROM samples WHERE status = 'ok' AND identity IS NOT NULL")


def _sql_str(s: str) -> str:
    return s.replace("'", "''")


def identities_table(layout: OutputLayout, opts: ReduceOptions) -> pa.Table:
    """One row per identity with IDIA votes and image-score aggregates."""
    con = duckdb.connect()
    _samples_relation(con, layout)
    joins, cols = [], []
    if opts.idia:
        joins.append(f"LEFT JOIN ({idia.identity_scores_sql('ok', opts.tau)}) i USING (identity)")
        cols += ["i.idia_score", "i.idia_member", "i.idia_top1_rate", "i.idia_mean_reciprocal_rank"]
    if opts.caption:
        joins.append(f"LEFT JOIN ({caption.identity_aggregates_sql('ok')}) c USING (identity)")
        cols += ["c.caption_score"]
    sql = f"""
        WITH base AS (
            SELECT identity,
                   count(*) FILTER (WHERE status = 'ok') AS n_images,
                   count(*) FILTER (WHERE status = 'error') AS n_errors
            FROM samples WHERE identity IS NOT NULL GROUP BY identity
        )
        SELECT base.* {''.join(', ' + c for c in cols)}
        FROM base {' '.join(joins)}
        ORDER BY identity
    """
    cur = con.execute(sql)
    names_ = [d[0] for d in cur.description]
    columns: dict[str, list] = {c: list(v) for c, v in zip(names_, zip(*cur.fetchall()))} or {c: [] for c in names_}
    names = columns["identity"]
    pool = _name_pool(opts.names)
    columns["in_name_pool"] = [None if pool is None else x in pool for x in names]
    labels = read_identity_labels(opts.labels) if opts.labels else {}
    columns["label_member"] = [labels.get(x) for x in names]
    if opts.idia:  # an identity with ok images but no vote row has score 0
        columns["idia_score"] = [
            s if s is not None else (0 if n else None) for s, n in zip(columns["idia_score"], columns["n_images"])
        ]
        columns["idia_member"] = [None if s is None else s >= opts.tau for s in columns["idia_score"]]
    n = len(names)
    arrays = [pa.array(columns.get(f.name, [None] * n), type=f.type) for f in IDENTITIES_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=IDENTITIES_SCHEMA)


def _name_pool(path: Path | None) -> set[str] | None:
    if path is None or not Path(path).is_file():
        return None
    return set(load_name_pool(path))


#: identity-level score columns used for metrics, per attack
IDENTITY_SCORES = {"idia": "idia_score", "caption": "caption_score"}


def compute_metrics(identities: pa.Table, opts: ReduceOptions) -> dict[str, Any]:
    """metrics.json: per attack, AUC and TPR at 1 % / 0.1 % FPR with bootstrap intervals."""
    label = np.array([x if x is not None else np.nan for x in identities.column("label_member").to_pylist()], float)
    out: dict[str, Any] = {}
    enabled = {"idia": opts.idia, "caption": opts.caption}
    for attack, col in IDENTITY_SCORES.items():
        if not enabled[attack]:
            continue
        score = np.array([np.nan if v is None else v for v in identities.column(col).to_pylist()], float)
        keep = ~np.isnan(label) & ~np.isnan(score)
        if keep.sum() == 0:
            continue
        m = membership_metrics(score[keep], label[keep].astype(bool))
        out[attack] = {"level": "identity", "score": col, **m}
    n_unlabeled = int(np.isnan(label).sum())
    out["n_unlabeled_identities"] = n_unlabeled
    return out


def reduce_outputs(layout: OutputLayout, opts: ReduceOptions) -> dict[str, Any]:
    """Write identities.parquet and (with labels) metrics.json; return the metrics."""
    if not any(layout.samples_dir.glob("*.parquet")):
        raise FileNotFoundError(f"no sample parts under {layout.samples_dir}: run the map step first")
    table = identities_table(layout, opts)
    atomic_write_table(layout.identities, table)
    if opts.labels is None:
        layout.metrics.unlink(missing_ok=True)
        return {}
    labels = read_identity_labels(opts.labels)
    seen = set(table.column("identity").to_pylist())
    metrics = compute_metrics(table, opts)
    metrics["n_labels_not_in_candidates"] = len(set(labels) - seen)
    atomic_write_json(layout.metrics, metrics)
    return metrics
