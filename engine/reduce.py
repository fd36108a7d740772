"""The reduce step: Parquet parts → identities.parquet (+ metrics.json with labels).

Reads only the outputs (no model, no GPU), so it can be re-run with another ``tau`` or
labels file. Aggregation runs in DuckDB, which streams over the parts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from .attacks import idia
from .attacks.idia import load_name_pool
from .controls import Controls, as_column, control_set, flag_column, pvalues, pvalues_against, threshold_entry
from .evaluate import Labels, Scored, evaluate, read_labels, shard_file_name
from .outputs import OutputLayout, atomic_write_json, atomic_write_table, load_schema
from .query import duckdb_views

ROC_SCHEMA = load_schema("roc")

log = logging.getLogger(__name__)

IDENTITIES_SCHEMA = load_schema("identities")
SAMPLE_SCORES_SCHEMA = load_schema("sample_scores")
#: attacks with a per-image score column ``<name>_score``
IMAGE_ATTACKS = ("encodermi", "partcrop", "mim", "caption")
def _image_scores(opts: "ReduceOptions") -> list[str]:
    """Per-image score names (``<name>_score`` columns) of the enabled attacks."""
    names = [a for a in IMAGE_ATTACKS if a in opts.attacks]
    return names + (["caption_calibrated"] if "caption" in opts.attacks else [])


#: attacks with a raw feature vector ``<name>_features`` for a learned (cross-fitted) variant
FEATURE_ATTACKS = {"encodermi", "partcrop", "mim"}


@dataclass(frozen=True)
class ReduceOptions:
    tau: int = 1
    labels: Path | None = None
    controls: Path | None = None
    target_fpr: float = 0.01
    names: Path | None = None
    attacks: tuple[str, ...] = ("idia", "caption")


def _connect(layout: OutputLayout) -> duckdb.DuckDBPyConnection:
    con = duckdb_views(layout, ("samples",))
    con.execute("CREATE VIEW ok AS SELECT * FROM samples WHERE status = 'ok' AND identity IS NOT NULL")
    return con


def _fetch(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, list]:
    cur = con.execute(sql)
    cols = [d[0] for d in cur.description]
    rows = cur.fetchall()
    return {c: [r[i] for r in rows] for i, c in enumerate(cols)}


def identities_table(layout: OutputLayout, opts: ReduceOptions, labels: Labels | None = None,
                     calibration: dict | None = None, controls: Controls | None = None) -> pa.Table:
    """One row per identity with IDIA votes, image-score aggregates and, where controls exist,
    p-values and flags (their thresholds go to ``calibration`` when given)."""
    con = _connect(layout)
    image = _image_scores(opts)
    joins, cols = [], []
    if "idia" in opts.attacks:
        joins.append(f"LEFT JOIN ({idia.identity_scores_sql('ok', opts.tau)}) i USING (identity)")
        cols += ["i.idia_score", "i.idia_member", "i.idia_top1_rate", "i.idia_mean_reciprocal_rank"]
    cols += [f"s.{a}_score" for a in image]
    aggregates = "".join(f", avg({a}_score) AS {a}_score" for a in image)
    sql = f"""
        WITH base AS (
            SELECT identity,
                   count(*) FILTER (WHERE status = 'ok') AS n_images,
                   count(*) FILTER (WHERE status = 'error') AS n_errors
            FROM samples WHERE identity IS NOT NULL GROUP BY identity
        ),
        image_scores AS (SELECT identity {aggregates} FROM ok GROUP BY identity)
        SELECT base.* {''.join(', ' + c for c in cols)}
        FROM base LEFT JOIN image_scores s USING (identity) {' '.join(joins)}
        ORDER BY identity
    """
    columns = _fetch(con, sql)
    names = columns["identity"]
    pool = _name_pool(opts.names)
    columns["in_name_pool"] = [None if pool is None else x in pool for x in names]
    ident_labels = labels.identities if labels else {}
    columns["label_member"] = [ident_labels.get(x) for x in names]
    if "idia" in opts.attacks:  # an identity with ok images but no vote row has score 0
        columns["idia_score"] = [
            s if s is not None else (0 if n else None) for s, n in zip(columns["idia_score"], columns["n_images"])
        ]
        columns["idia_member"] = [None if s is None else s >= opts.tau for s in columns["idia_score"]]
    if controls is None:
        controls = control_set(opts.controls, labels)
    columns.update(_identity_calibration(columns, opts, controls, calibration))
    n = len(names)
    arrays = [pa.array(columns.get(f.name, [None] * n), type=f.type) for f in IDENTITIES_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=IDENTITIES_SCHEMA)


def _identity_calibration(columns: dict[str, list], opts: ReduceOptions, controls: Controls,
                          calibration: dict | None) -> dict[str, list]:
    """Per attack: each identity's p-value among the control identities, and its flag."""
    is_control = np.array([x in controls.identities for x in columns["identity"]], dtype=bool)
    out: dict[str, list] = {}
    for attack in ["idia"] + _image_scores(opts):
        col = f"{attack}_score"
        if col not in columns or not is_control.any():
            continue
        if all(v is None for v in columns[col]):
            continue  # not computed (e.g. caption_calibrated without a reference model)
        p, c = pvalues(_vec(columns[col]), is_control)
        if calibration is not None:
            hit = p <= opts.target_fpr
            calibration.setdefault("identity", {})[attack] = threshold_entry(
                c, int((~np.isnan(p) & ~is_control).sum()), int((hit & ~is_control).sum()),
                int((hit & is_control).sum()), opts.target_fpr)
        if c.size >= 2:
            out[f"{attack}_pvalue"] = as_column(p)
            out[f"{attack}_flag"] = flag_column(p, opts.target_fpr)
    return out


def _sample_calibration(layout: OutputLayout, opts: ReduceOptions, controls: Controls, calibration: dict) -> None:
    """Per-image p-values and flags among control images (images listed as controls, or of a
    control identity), one ``sample_scores/`` part per ``samples/`` part. Two passes over the
    parts (control scores first), reading only the needed columns: memory stays per part."""
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    attacks = _image_scores(opts)
    out_dir = layout.sample_scores_dir
    parts = sorted(layout.samples_dir.glob("*.parquet"))
    if not attacks:  # no image-side scores to calibrate (e.g. an IDIA-only job)
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    cols = ["shard", "key", "position", "identity", "status"] + [f"{a}_score" for a in attacks]

    def read(part: Path) -> tuple[pa.Table, np.ndarray]:
        t = pq.read_table(part, columns=cols)
        t = t.filter(pc.equal(t["status"], "ok"))
        shard_names = [shard_file_name(x) for x in t.column("shard").to_pylist()]
        is_control = np.array([i in controls.identities or (sn, k) in controls.images for i, sn, k in
                               zip(t.column("identity").to_pylist(), shard_names, t.column("key").to_pylist())],
                              dtype=bool)
        return t, is_control

    control_scores: dict[str, list[np.ndarray]] = {a: [] for a in attacks}
    computed: set[str] = set()
    for part in parts:
        t, is_control = read(part)
        for a in attacks:
            s = _arrow_vec(t.column(f"{a}_score"))
            if not np.isnan(s).all():
                computed.add(a)
            s = s[is_control]
            control_scores[a].append(s[~np.isnan(s)])
    attacks = [a for a in attacks if a in computed]  # e.g. no caption_calibrated without a reference model
    sorted_controls = {a: np.sort(np.concatenate(v)) if v else np.array([]) for a, v in control_scores.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    written, control_identities = set(), set()
    flagged, control_flagged, scored = ({a: 0 for a in attacks} for _ in range(3))
    for part in parts:
        t, is_control = read(part)
        columns: dict[str, Any] = {k: t.column(k) for k in ("shard", "key", "position", "identity")}
        columns["is_control"] = pa.array(is_control)
        for a in attacks:
            p = pvalues_against(_arrow_vec(t.column(f"{a}_score")), is_control, sorted_controls[a])
            hit = p <= opts.target_fpr
            columns[f"{a}_pvalue"] = pa.array(p, mask=np.isnan(p))
            columns[f"{a}_flag"] = pa.array(hit, mask=np.isnan(p))
            flagged[a] += int((hit & ~is_control).sum())
            control_flagged[a] += int((hit & is_control).sum())
            scored[a] += int((~np.isnan(p) & ~is_control).sum())
        control_identities.update(np.array(t.column("identity").to_pylist(), dtype=object)[is_control])
        arrays = [columns.get(f.name, pa.nulls(t.num_rows, f.type)) for f in SAMPLE_SCORES_SCHEMA]
        atomic_write_table(out_dir / part.name, pa.Table.from_arrays(arrays, schema=SAMPLE_SCORES_SCHEMA))
        written.add(part.name)
    for stale in out_dir.glob("*.parquet"):
        if stale.name not in written:
            stale.unlink()
    level = calibration.setdefault("image", {})
    for a in attacks:
        level[a] = threshold_entry(sorted_controls[a], scored[a], flagged[a], control_flagged[a], opts.target_fpr,
                                   control_groups=len(control_identities))


def _name_pool(path: Path | None) -> set[str] | None:
    if path is None or not Path(path).is_file():
        return None
    return set(load_name_pool(path))


def _matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow column of equal-length lists → float matrix; nan rows for null or odd-length
    entries. Converted without a Python loop over rows."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = arr.value_lengths().to_numpy(zero_copy_only=False).astype(float)  # null → nan
    valid = ~np.isnan(lengths)
    width = int(lengths[valid][0]) if valid.any() else 0
    out = np.full((len(arr), width), np.nan)
    good = lengths == width  # nan (null) never equals
    if good.any():
        flat = pa.compute.list_flatten(arr.filter(pa.array(good))).to_numpy(zero_copy_only=False)
        out[good] = flat.astype(float).reshape(-1, width)
    return out


def _arrow(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    return con.sql(sql).to_arrow_table()


def _arrow_vec(column) -> np.ndarray:
    """A numeric Arrow column → float vector with nan for null."""
    return column.to_numpy(zero_copy_only=False).astype(float)


def _vec(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _feature_columns(opts: ReduceOptions) -> list[str]:
    return [f"{a}_features" for a in FEATURE_ATTACKS if a in opts.attacks] + ["baseline_features"]


def _identity_level(con, identities: pa.Table, labels: Labels, opts: ReduceOptions) -> Scored | None:
    rows = [r for r in identities.to_pylist() if r["label_member"] is not None and r["n_images"]]
    if not rows:
        return None
    names = [r["identity"] for r in rows]
    scores = {}
    if "idia" in opts.attacks:
        scores["idia"] = _vec([r["idia_score"] for r in rows])
    for a in _image_scores(opts):
        scores[a] = _vec([r[f"{a}_score"] for r in rows])
    con.register("labelled_names", pa.table({"identity": names}))
    feats = _feature_columns(opts)
    per_image = _arrow(con, f"SELECT identity, {', '.join(feats)} FROM ok WHERE identity IN "
                            "(SELECT identity FROM labelled_names)")
    features = {}
    index = {n: i for i, n in enumerate(names)}
    rows_of = np.array([index[x] for x in per_image.column("identity").to_pylist()], dtype=np.int64)
    for col in feats:  # mean feature vector per identity over its complete rows
        mat = _matrix(per_image.column(col))
        complete = ~np.isnan(mat).any(axis=1)
        sums = np.zeros((len(names), mat.shape[1]))
        np.add.at(sums, rows_of[complete], mat[complete])
        counts = np.bincount(rows_of[complete], minlength=len(names)).astype(float)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            features[col.removesuffix("_features")] = sums / counts
    y = np.array([r["label_member"] for r in rows], dtype=bool)
    return Scored("identity", y, np.arange(len(rows)), scores, features)


def _image_level(con, labels: Labels, opts: ReduceOptions) -> Scored | None:
    if not labels.images:
        return None
    image = _image_scores(opts)
    if not image:
        return None
    lab = pa.table({"shard_name": [k[0] for k in labels.images], "key": [k[1] for k in labels.images],
                    "member": list(labels.images.values())})
    con.register("image_labels", lab)
    cols = ", ".join([f"ok.{a}_score" for a in image] + [f"ok.{c}" for c in _feature_columns(opts)])
    data = _arrow(con, f"""
        SELECT ok.identity, l.member, {cols} FROM ok JOIN image_labels l
        ON l.key = ok.key AND l.shard_name = regexp_extract(ok.shard, '[^/\\\\]+$')
    """)
    if not data.num_rows:
        log.warning("labels: no image row matched a sample (rows match by shard file name and key)")
        return None
    groups = np.unique(np.array(data.column("identity").to_pylist(), dtype=object), return_inverse=True)[1]
    scores = {a: _arrow_vec(data.column(f"{a}_score")) for a in image}
    features = {c.removesuffix("_features"): _matrix(data.column(c)) for c in _feature_columns(opts)}
    member = data.column("member").to_numpy(zero_copy_only=False).astype(bool)
    return Scored("image", member, groups, scores, features)


def reduce_outputs(layout: OutputLayout, opts: ReduceOptions) -> dict[str, Any]:
    """Write identities.parquet; with controls (a controls file or labelled non-members) also
    calibration.json and sample_scores/; with labels also metrics.json + roc.parquet.
    Returns the metrics."""
    if not any(layout.samples_dir.glob("*.parquet")):
        raise FileNotFoundError(f"no sample parts under {layout.samples_dir}: run the map step first")
    labels = read_labels(opts.labels) if opts.labels else None
    controls = control_set(opts.controls, labels)
    calibration: dict[str, Any] = {}
    t0 = time.perf_counter()
    table = identities_table(layout, opts, labels, calibration, controls)
    atomic_write_table(layout.identities, table)
    log.info("%d identities in %.1f s", table.num_rows, time.perf_counter() - t0)
    seen = set(table.column("identity").to_pylist())
    if controls:
        t0 = time.perf_counter()
        _write_calibration(layout, opts, controls, calibration, seen)
        log.info("calibration against %d control identities / %d control images in %.1f s",
                 len(controls.identities), len(controls.images), time.perf_counter() - t0)
    else:
        _write_calibration(layout, opts, controls, calibration, seen)
    if labels is None:
        layout.metrics.unlink(missing_ok=True)
        layout.roc.unlink(missing_ok=True)
        return {}
    con = _connect(layout)
    tables = [t for t in (_identity_level(con, table, labels, opts), _image_level(con, labels, opts)) if t]
    # an image-level table (when present) replaces the identity level for image-side attacks
    if len(tables) == 2:
        for a in _image_scores(opts):
            tables[0].scores.pop(a, None)
            tables[0].features.pop(a, None)
    t0 = time.perf_counter()
    log.info("metrics with bootstrap intervals for %s level(s), %d labelled units",
             "+".join(t.level for t in tables), sum(len(t.labels) for t in tables))
    metrics, roc_rows = evaluate(tables, FEATURE_ATTACKS)
    log.info("metrics in %.1f s", time.perf_counter() - t0)
    metrics["n_unlabeled_identities"] = sum(v is None for v in table.column("label_member").to_pylist())
    metrics["n_labels_not_in_candidates"] = len(set(labels.identities) - seen)
    atomic_write_json(layout.metrics, metrics)
    atomic_write_table(layout.roc, pa.Table.from_pylist(roc_rows, schema=ROC_SCHEMA))
    return metrics


def _write_calibration(layout: OutputLayout, opts: ReduceOptions, controls: Controls, calibration: dict,
                       seen: set[str]) -> None:
    import shutil

    if not controls:
        layout.calibration.unlink(missing_ok=True)
        shutil.rmtree(layout.sample_scores_dir, ignore_errors=True)
        return
    _sample_calibration(layout, opts, controls, calibration)
    atomic_write_json(layout.calibration, {
        "target_fpr": opts.target_fpr,
        "controls": {"sources": controls.sources, "identities": len(controls.identities),
                     "identities_in_candidates": len(controls.identities & seen), "images": len(controls.images)},
        "method": "conformal: p = (1 + #{control scores >= s}) / (1 + n_controls); flag = p <= target_fpr, which "
                  "for a non-control is score >= threshold. A new non-member drawn like the controls is flagged "
                  "with probability <= target_fpr. A control is compared with the other controls only "
                  "(leave-one-out); `flagged` counts non-controls, `controls_flagged_leave_one_out` the controls.",
        **calibration,
    })
