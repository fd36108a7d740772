"""Step 3 of the reduce: scoring attacks against ground truth — per-attack metrics at each
level, ROC tables, learned variants, and the distribution-shift validity check.

Levels: identity-level scores (e.g. IDIA) are evaluated per identity. Image-level scores are
evaluated per image where the labels file has image rows (``shard,key,member``), else per
identity (mean image score). Fixed scores (a mean cosine) need no fitting. Learned variants
(an attacker on an attack's raw feature vector, declared by the attack) and the model-free
baseline are cross-fitted: every prediction comes from a model fitted on other folds, and
all images of one identity stay in the same fold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..attacks.registry import LOGISTIC, Learned, registered, scores
from .learned import crossfit_proba
from .labels import Labels
from . import validity
from .statistics import float_vector, membership_metrics, roc_curve

if TYPE_CHECKING:
    from .pipeline import ReduceOptions

log = logging.getLogger(__name__)

#: the keys of the model-free image statistics and caption features among a table's features
BASELINE = "baseline"
BASELINE_TEXT = "baseline_text"
_BASELINE_LEARNER = LOGISTIC


@dataclass
class Scored:
    """One evaluation table: a score per unit, its label, its group, optional features."""

    level: str
    labels: np.ndarray
    groups: np.ndarray
    scores: dict[str, np.ndarray]  # attack → fixed score (nan = missing)
    features: dict[str, np.ndarray]  # attack/"baseline" → feature matrix (rows may hold nan)


#: cross-fits per learned attacker with different fold assignments: the point estimate is the
#: first's, the bootstrap interval cycles through all of them (so it includes the fitting variance)
REFITS = 5
#: the same for MLP attackers and the blind baseline (trees): each fit costs 10-50× a logistic one,
#: so they are cross-fitted once and their interval is the bootstrap's alone (measured on the demo:
#: its metrics step 23.6 s with 5 refits and 500 MLP iterations, 3.5 s with 1 and 200)
COSTLY_REFITS = 1


def _refits(model: str) -> int:
    return REFITS if model == "logistic" else COSTLY_REFITS


def _clusters(groups: np.ndarray, level: str) -> np.ndarray | None:
    """Image-level intervals resample whole identities; identity-level ones, identities."""
    return groups if level == "image" else None


def _evaluate_fixed(name: str, score: np.ndarray, y: np.ndarray, level: str, roc_rows: list,
                    groups: np.ndarray) -> dict | None:
    keep = ~np.isnan(score)
    if keep.sum() < 2 or y[keep].all() or not y[keep].any():
        return None
    m = membership_metrics(score[keep], y[keep], groups=_clusters(groups[keep], level))
    _roc_rows(roc_rows, name, level, "threshold", score[keep], y[keep])
    return {"level": level, "variant": "threshold", "what": "the attack's own score, thresholded", **m}


def _evaluate_learned(name: str, X: np.ndarray, y: np.ndarray, groups: np.ndarray, level: str,
                      roc_rows: list, learner: Learned) -> dict | None:
    variant, what = learner.name, learner.what
    X = learner.prepare(X)
    keep = ~np.all(np.isnan(X), axis=1)
    if keep.sum() < 4 or y[keep].all() or not y[keep].any() or len(np.unique(groups[keep])) < 2:
        return None
    fits = [crossfit_proba(X[keep], y[keep], groups=groups[keep], folds=5, seed=s, kind=learner.model)
            for s in range(_refits(learner.model))]
    _roc_rows(roc_rows, name, level, variant, fits[0], y[keep])
    m = membership_metrics(fits[0], y[keep], groups=_clusters(groups[keep], level), score_sets=fits)
    return {"level": level, "variant": variant, "what": what, **m}


def _roc_rows(out: list, attack: str, level: str, variant: str, s: np.ndarray, y: np.ndarray) -> None:
    roc = roc_curve(s, y)
    for f, t, th in zip(roc.fpr, roc.tpr, roc.thresholds):
        out.append({"attack": attack, "level": level, "variant": variant, "fpr": float(f), "tpr": float(t),
                    "threshold": float(th)})


def evaluate(tables: list[Scored]) -> tuple[dict[str, Any], list[dict]]:
    """metrics.json content and ROC rows for every score at its level, plus the baseline."""
    metrics: dict[str, Any] = {}
    roc_rows: list[dict] = []
    baselines: dict[str, dict[str, Any]] = {}
    learned_of = {a.name: a.learned for a in registered() if a.features}
    for t in tables:
        for name, score in t.scores.items():
            fixed = _evaluate_fixed(name, score, t.labels, t.level, roc_rows, t.groups)
            if fixed is None:
                continue
            if name in learned_of and name in t.features:  # an attack's own score carries its learned variants
                for learner in learned_of[name]:
                    learned = _evaluate_learned(name, t.features[name], t.labels, t.groups, t.level, roc_rows,
                                                learner)
                    if learned is not None:
                        fixed[learner.name] = learned
            metrics[name] = fixed
        level_metrics = [m for m in metrics.values() if isinstance(m, dict) and m.get("level") == t.level]
        if BASELINE in t.features and level_metrics:
            b = _blind_baseline(t, roc_rows)
            if b is not None:
                b["best_attack_auc"] = max(_best_auc(m) for m in level_metrics)
                baselines[t.level] = b
                for m in level_metrics:
                    m["baseline_auc"] = b["auc"]
    if baselines:
        metrics[BASELINE] = {"auc": max(b["auc"] for b in baselines.values()),
                             "what": next(iter(baselines.values()))["what"],
                             "warning": any(b["warning"] for b in baselines.values()), "by_level": baselines}
    metrics["distribution_shift_warning"] = any(b["warning"] for b in baselines.values())
    metrics["shift_rule"] = validity.rule()
    return metrics, roc_rows


def _blind_baseline(t: Scored, roc_rows: list) -> dict[str, Any] | None:
    """The validity check at one level: the blind baseline's metrics and warning."""
    text = t.features.get(BASELINE_TEXT)
    fits = validity.blind_scores(t.features[BASELINE], text, t.labels, t.groups, COSTLY_REFITS)
    if fits is None:
        return None
    keep = ~np.isnan(fits[0])
    y = t.labels[keep]
    if y.all() or not y.any():
        return None
    _roc_rows(roc_rows, BASELINE, t.level, "learned", fits[0][keep], y)
    m = membership_metrics(fits[0][keep], y, groups=_clusters(t.groups[keep], t.level),
                           score_sets=[f[keep] for f in fits])
    warn = m["auc_ci"] is not None and m["auc_ci"][0] > validity.SHIFT_FLOOR
    return {"level": t.level, "variant": "learned", "what": validity.describe(text is not None), **m,
            "warning": bool(warn)}


def _best_auc(m: dict) -> float:
    """The best AUC of a score's entry: its fixed score or any learned variant."""
    vals = [m.get("auc", float("nan"))] + [v.get("auc", float("nan")) for v in m.values() if isinstance(v, dict)]
    vals = [v for v in vals if v == v]
    return max(vals) if vals else 0.0


# -- evaluation tables -------------------------------------------------------------

def _feature_columns(opts: "ReduceOptions") -> dict[str, str]:
    """Feature key → samples column: each enabled attack's feature vector, plus the baseline's."""
    out = {a.name: a.features for a in registered() if a.name in opts.enabled and a.features}
    return {**out, BASELINE: "baseline_features"}


def identity_table(con: duckdb.DuckDBPyConnection, identities: pa.Table, opts: "ReduceOptions",
                   excluded: dict[str, set[str]] | None = None) -> Scored | None:
    """Labelled identities with their identity-level and mean image scores and mean features;
    ``excluded``: per attack, identities left out of its scores (nan)."""
    rows = [r for r in identities.to_pylist() if r["label_member"] is not None and r["n_images"]]
    if not rows:
        return None
    names = [r["identity"] for r in rows]
    attack_of = {s.name: a.name for a in registered() for s in a.scores}
    table_scores = {}
    for s in scores(opts.enabled):  # the score's metric column (e.g. at a fixed k), else its all-image score
        values = [r.get(s.metric) for r in rows]
        if not any(v is not None for v in values):
            values = [r[f"{s.name}_score"] for r in rows]
        left_out = (excluded or {}).get(attack_of[s.name], set())
        table_scores[s.name] = float_vector([None if n in left_out else v for n, v in zip(names, values)])
    con.register("labelled_names", pa.table({"identity": names}))
    feats = _feature_columns(opts)
    per_image = con.sql(f"SELECT identity, {', '.join(feats.values())}, caption FROM ok WHERE identity IN "
                        "(SELECT identity FROM labelled_names) ORDER BY identity, shard, position").to_arrow_table()
    features = {}
    index = {n: i for i, n in enumerate(names)}
    rows_of = np.array([index[x] for x in per_image.column("identity").to_pylist()], dtype=np.int64)
    matrices = {key: feature_matrix(per_image.column(col)) for key, col in feats.items()}
    text = validity.text_features(per_image.column("caption").to_pylist(), per_image.column("identity").to_pylist())
    if text is not None:
        matrices[BASELINE_TEXT] = text
    for key, mat in matrices.items():  # mean feature vector per identity over its complete rows
        complete = ~np.isnan(mat).any(axis=1)
        sums = np.zeros((len(names), mat.shape[1]))
        np.add.at(sums, rows_of[complete], mat[complete])
        counts = np.bincount(rows_of[complete], minlength=len(names)).astype(float)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            features[key] = sums / counts
    y = np.array([r["label_member"] for r in rows], dtype=bool)
    return Scored("identity", y, np.arange(len(rows)), table_scores, features)


def image_table(con: duckdb.DuckDBPyConnection, labels: Labels, opts: "ReduceOptions") -> Scored | None:
    """Labelled images (image rows of the labels file) with their image-level scores and features."""
    image = [s.name for s in scores(opts.enabled, "image")]
    if not labels.images or not image:
        return None
    lab = pa.table({"shard": [k[0] for k in labels.images], "key": [k[1] for k in labels.images],
                    "member": list(labels.images.values())})
    con.register("image_labels", lab)
    feats = _feature_columns(opts)
    cols = ", ".join([f"ok.{a}_score" for a in image] + [f"ok.{c}" for c in feats.values()] + ["ok.caption"])
    data = con.sql(f"""
        SELECT ok.identity, l.member, {cols} FROM ok JOIN image_labels l
        ON l.key = ok.key AND l.shard = ok.shard
        ORDER BY ok.shard, ok.position  -- a fixed order: folds and resamples depend on it
    """).to_arrow_table()
    if not data.num_rows:
        log.warning("labels: no image row matched a sample (rows match by shard and key)")
        return None
    groups = np.unique(np.array(data.column("identity").to_pylist(), dtype=object), return_inverse=True)[1]
    table_scores = {a: float_vector(data.column(f"{a}_score")) for a in image}
    features = {key: feature_matrix(data.column(col)) for key, col in feats.items()}
    member = data.column("member").to_numpy(zero_copy_only=False).astype(bool)
    text = validity.text_features(data.column("caption").to_pylist(), data.column("identity").to_pylist())
    if text is not None:
        features[BASELINE_TEXT] = text
    return Scored("image", member, groups, table_scores, features)


def evaluation_tables(con: duckdb.DuckDBPyConnection, identities: pa.Table, labels: Labels,
                      opts: "ReduceOptions", excluded: dict[str, set[str]] | None = None) -> list[Scored]:
    """The identity-level table and, with image labels, the image-level one — which then
    replaces the identity level for image-level scores."""
    ident, image = identity_table(con, identities, opts, excluded), image_table(con, labels, opts)
    if ident is not None and image is not None:
        for s in scores(opts.enabled, "image"):
            ident.scores.pop(s.name, None)
            ident.features.pop(s.name, None)
    return [t for t in (ident, image) if t is not None]


def feature_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow column of equal-length lists → float matrix; nan rows for null or odd-length
    entries. Converted without a Python loop over rows."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = arr.value_lengths().to_numpy(zero_copy_only=False).astype(float)  # null → nan
    valid = ~np.isnan(lengths)
    width = int(lengths[valid][0]) if valid.any() else 0
    out = np.full((len(arr), width), np.nan)
    good = lengths == width  # nan (null) never equals
    if good.any():
        flat = pc.list_flatten(arr.filter(pa.array(good))).to_numpy(zero_copy_only=False)
        out[good] = flat.astype(float).reshape(-1, width)
    return out
