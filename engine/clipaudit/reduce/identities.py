"""Step 1 of the reduce: one row per identity.

Counts of ok and error rows, each identity-level attack's own per-identity SQL (e.g. a
plurality vote, declared in its module), the mean of every image-level score, whether the
name is in the pool, the label where one is given, and — where there are controls — each
score's conformal p-value and flag (:mod:`.conformal`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Mapping

import duckdb
import numpy as np
import pyarrow as pa

from clipaudit.contract.registry import AnalysisInput, registered, scores
from clipaudit.io.outputs import OutputLayout
from clipaudit.contract.schemas import load_schema
from clipaudit.reduce.conformal import (
    as_column, bh_qvalues, cauchy_combination, count_matched_pvalues, discovery_entry, flag_column, identity_pvalues
)
from clipaudit.core.statistics import float_vector
from clipaudit.data.labels import LabelsError, missing_from_pool, missing_names_message, Controls, Labels, control_set
from clipaudit.reduce.tables import connect
from clipaudit.data.urls import is_url
from clipaudit.data.names import load_name_pool

if TYPE_CHECKING:
    from clipaudit.reduce.options import ReduceOptions


@dataclass
class IdentityLevel:
    """The identities table and, per score, what the identity-level calibration found."""

    table: pa.Table
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    analyses: dict[str, dict[str, Any]] = field(default_factory=dict)  # attack → its own metrics entries
    excluded: dict[str, set[str]] = field(default_factory=dict)  # attack → identities left out of its figures
    draws: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # column → identity → per-draw values
    pool: set[str] | None = None  # the name pool (None without a readable one)


def fetch_columns(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, list]:
    cur = con.execute(sql)
    cols = [d[0] for d in cur.description]
    rows = cur.fetchall()
    return {c: [r[i] for r in rows] for i, c in enumerate(cols)}


def identity_level(layout: OutputLayout, opts: ReduceOptions, labels: Labels | None = None,
                   controls: Controls | None = None) -> IdentityLevel:
    """Build ``identities.parquet``'s table (not written here)."""
    con = connect(layout, opts.copies, opts.memory_limit)
    image = [s.name for s in scores(opts.enabled, "image")]
    joins, cols = [], []
    for i, attack in enumerate(a for a in registered() if a.name in opts.enabled and a.identity_sql is not None):
        joins.append(f"LEFT JOIN ({attack.identity_sql('ok', opts.params(attack.name))}) a{i} USING (identity)")
        cols.append(f"a{i}.* EXCLUDE (identity)")
    cols += [f"s.{a}_score, s.{a}_n" for a in image]
    aggregates = "".join(f", avg({a}_score) AS {a}_score, count({a}_score) AS {a}_n" for a in image)
    columns = fetch_columns(con, f"""
        WITH errors AS (
            SELECT identity, count(*) FILTER (WHERE status = 'error') AS n_errors
            FROM samples WHERE identity IS NOT NULL GROUP BY identity
        ),
        counted AS (SELECT identity, count(*) AS n_images FROM ok GROUP BY identity),
        base AS (
            SELECT identity, coalesce(counted.n_images, 0) AS n_images, errors.n_errors
            FROM errors LEFT JOIN counted USING (identity)
        ),
        image_scores AS (SELECT identity {aggregates} FROM ok GROUP BY identity)
        SELECT base.* {''.join(', ' + c for c in cols)}
        FROM base LEFT JOIN image_scores s USING (identity) {' '.join(joins)}
        ORDER BY identity
    """)
    names = columns["identity"]
    analyses: dict[str, dict[str, Any]] = {}
    draws: dict[str, dict[str, np.ndarray]] = {}
    ident_labels = labels.identities if labels else None
    pool = name_pool(opts.names, opts.storage_options)
    if controls is None:
        controls = control_set(opts.controls, labels, storage_options=opts.storage_options)
    excluded = _excluded(opts, pool, set(ident_labels or {}) | controls.identities)
    for attack in registered():
        if attack.name in opts.enabled and attack.analyse is not None:
            found = attack.analyse(AnalysisInput(con, opts.params(attack.name), opts.seed, ident_labels,
                                                 frozenset(excluded.get(attack.name, ()))))
            for col, by_identity in found.columns.items():
                columns[col] = [by_identity.get(n) for n in names]
            analyses[attack.name] = found.metrics
            draws.update(found.draws)
    is_control = np.array([x in controls.identities for x in names], dtype=bool)
    con_scores = _control_image_scores(con, [n for n, c in zip(names, is_control) if c], image)
    con.close()
    columns["in_name_pool"] = [None if pool is None else x in pool for x in names]
    columns["label_member"] = [(ident_labels or {}).get(x) for x in names]
    calibration: dict[str, dict[str, Any]] = {}
    attack_of = {s.name: a.name for a in registered() for s in a.scores}
    for score in scores(opts.enabled):  # on the statistic shown beside the p-value: the metric column, if any
        stat = score.metric if any(v is not None for v in columns.get(score.metric) or []) else f"{score.name}_score"
        values = columns.get(stat)
        left_out = excluded.get(attack_of[score.name], set())
        if values is not None and left_out:  # neither a control nor a candidate of this score
            values = [None if n in left_out else v for n, v in zip(names, values)]
        matched = None
        if score.level == "image" and values is not None:  # a mean over n images: compared at n images
            matched = count_matched_pvalues(float_vector(values), np.array(columns[f"{score.name}_n"]), is_control,
                                            _control_images(con_scores, names, is_control, score.name), opts.seed)
        found = identity_pvalues(values, is_control, opts.target_fpr, matched)
        if found is None:
            continue
        calibration[score.name] = {"statistic": stat, **found.entry}
        unscored = sum(v is None for v in values) - len(left_out & set(names))
        if unscored:  # e.g. fewer images than the attack's k: no comparable statistic, so no p-value
            calibration[score.name]["n_without_statistic"] = unscored
        if found.pvalues is not None:
            p = float_vector(found.pvalues)
            q = bh_qvalues(p, ~is_control)
            columns[f"{score.name}_pvalue"] = found.pvalues
            columns[f"{score.name}_flag"] = found.flags
            columns[f"{score.name}_qvalue"] = as_column(q)
            columns[f"{score.name}_discovery"] = flag_column(q, opts.fdr)
            calibration[score.name].update(discovery_entry(int(np.sum(q <= opts.fdr)), opts.fdr))
    combined = [float_vector(columns[f"{s.name}_pvalue"]) for s in scores(opts.enabled)
                if f"{s.name}_pvalue" in columns]
    if combined:  # one p-value per identity across the attacks, and its q-value among the candidates
        p = cauchy_combination(combined)
        q = bh_qvalues(p, ~is_control)
        columns["membership_pvalue"], columns["membership_qvalue"] = as_column(p), as_column(q)
        columns["membership_discovery"] = flag_column(q, opts.fdr)
        calibration["membership"] = {"what": "Cauchy combination of the identity's score p-values",
                                     **discovery_entry(int(np.sum(q <= opts.fdr)), opts.fdr)}
    columns["is_control"] = [bool(x) for x in is_control]
    schema = load_schema("identities", opts.enabled)
    n = len(names)
    arrays = [pa.array(columns.get(f.name, [None] * n), type=f.type) for f in schema]
    return IdentityLevel(pa.Table.from_arrays(arrays, schema=schema), calibration, analyses, excluded, draws, pool)


def _control_image_scores(con: duckdb.DuckDBPyConnection, control_names: list[str], image: list[str]
                          ) -> dict[str, dict[str, np.ndarray]]:
    """Per image score: each control identity's image scores (non-null), for count-matched
    p-values. Controls are a small calibration set, so this stays small."""
    if not control_names or not image:
        return {}
    con.register("control_names", pa.table({"identity": control_names}))
    lists = ", ".join(f"list({a}_score) FILTER (WHERE {a}_score IS NOT NULL) AS {a}" for a in image)
    t = con.sql(f"SELECT identity, {lists} FROM ok WHERE identity IN (SELECT identity FROM control_names) "
                "GROUP BY identity").to_arrow_table().to_pydict()
    return {a: {n: np.asarray(v or [], dtype=float) for n, v in zip(t["identity"], t[a])} for a in image}


def _control_images(con_scores: dict[str, dict[str, np.ndarray]], names: list[str], is_control: np.ndarray,
                    score: str) -> dict[int, np.ndarray]:
    by_name = con_scores.get(score, {})
    return {int(i): by_name[names[i]] for i in np.flatnonzero(is_control) if names[i] in by_name}


def identities_table(layout: OutputLayout, opts: ReduceOptions, labels: Labels | None = None,
                     controls: Controls | None = None) -> pa.Table:
    """One row per identity (see :func:`identity_level`)."""
    return identity_level(layout, opts, labels, controls).table


def name_pool(path: Path | str | None, storage_options: Mapping[str, Any] | None = None) -> set[str] | None:
    """The name pool as a set; None without a readable file or URL."""
    if path is None or not (is_url(str(path)) or Path(path).is_file()):
        return None
    return set(load_name_pool(path, storage_options))


def _excluded(opts: ReduceOptions, pool: set[str] | None, named: set[str]) -> dict[str, set[str]]:
    """Per attack with a ``missing_names`` parameter: the labelled or control identities the pool
    lacks, to leave out of its figures (``exclude``); with ``error`` they stop the reduce step."""
    if pool is None or not named:
        return {}
    out = {}
    for name in opts.enabled:
        mode = getattr(opts.params(name), "missing_names", None)
        missing = missing_from_pool(named, pool) if mode is not None else []
        if missing and mode == "error":
            raise LabelsError(f"attacks.{name}.missing_names: error: "
                              + missing_names_message(name, missing, opts.names))
        if missing:
            out[name] = set(missing)
    return out
