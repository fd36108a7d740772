"""Step 3 of the reduce: scoring attacks against ground truth — per-attack metrics at each
level, ROC tables, learned variants, and the distribution-shift validity check.

Levels: identity-level scores (e.g. a name-ranking vote) are evaluated per identity. Image-level scores are
evaluated per image where the labels file has image rows (``shard,key,member``), else per
identity (mean image score); with image rows, also within identities (members' training photos
against the same people's other photos: ``image_within_identity``). Fixed scores (a mean cosine) need no
fitting. Learned variants
(an attacker on an attack's raw feature vector, declared by the attack) and the model-free
baseline are cross-fitted: every prediction comes from a model fitted on other folds, and
all images of one identity stay in the same fold.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.contract.registry import LOGISTIC, Learned, registered, scores
from clipaudit.reduce.learned import crossfit_folds, crossfit_proba
from clipaudit.data.labels import Labels
from clipaudit.reduce import validity
from clipaudit.core.statistics import (
    AucEstimate, auc, float_vector, fold_averaged_roc, membership_metrics, paired_auc_difference, roc_curve
)

if TYPE_CHECKING:
    from clipaudit.reduce.options import ReduceOptions

log = logging.getLogger(__name__)

#: the keys of the model-free image statistics and caption features among a table's features
BASELINE = "baseline"
BASELINE_TEXT = "baseline_text"
BASELINE_NAMES = "baseline_names"  # identity level: what the names alone say
_BASELINE_LEARNER = LOGISTIC


@dataclass
class Scored:
    """One evaluation table: a score per unit, its label, its group, optional features."""

    level: str
    labels: np.ndarray
    groups: np.ndarray
    scores: dict[str, np.ndarray]  # attack → fixed score (nan = missing)
    features: dict[str, np.ndarray]  # attack/"baseline" → feature matrix (rows may hold nan)
    #: score → its value on each draw (units × draws), where the score is a mean over draws (k images per identity):
    #: its metrics are computed per draw and averaged
    draws: dict[str, np.ndarray] = field(default_factory=dict)
    #: for a table cut from the image level (within identities): its rows there. Learned attackers
    #: and the baseline are not refitted for it: their image-level out-of-fold scores are evaluated
    rows: np.ndarray | None = None
    #: the evaluation sample this table holds (:func:`capped_sql`): units kept and of how many
    sample: dict[str, Any] = field(default_factory=dict)


#: the evaluation's sample (metrics, learned attackers' cross-fits, the blind baseline): at most
#: this many images per identity, chosen by a seeded hash of (shard, key) — also the images an
#: identity's mean image features come from —
EVAL_PER_IDENTITY = 100
#: and at most this many units per level: whole identities, in a seeded hash order, while their
#: (capped) images fit. A fixed cap keeps the reduce step's time and memory bounded however many
#: labelled units an audit has (the MLP attackers' fits grow with it); the demo's labs are far below both
EVAL_MAX_UNITS = 50_000


def capped_sql(select: str, seed: int, per_identity: int, max_units: int | None) -> str:
    """SQL of the rows of ``select`` (with identity, shard, key and position columns) cut to the
    seeded evaluation sample: per identity the first ``per_identity`` by md5 of (shard, key,
    seed), then whole identities by md5 of (identity, seed) while the rows fit ``max_units``.
    md5, not DuckDB's hash(): the same rows on any DuckDB version."""
    total = "" if max_units is None else f"WHERE upto <= {int(max_units)}"
    seed = f"'{int(seed)}'"
    return f"""
        WITH picked AS ({select}),
        ranked AS (SELECT *, coalesce(identity, '') AS _who,
                          row_number() OVER (PARTITION BY coalesce(identity, '')
                                             ORDER BY md5(concat_ws(chr(0), shard, key, {seed})), shard, key) AS _nth
                   FROM picked),
        capped AS (SELECT * FROM ranked WHERE _nth <= {int(per_identity)}),
        sizes AS (SELECT _who, count(*) AS n, md5(concat_ws(chr(0), _who, {seed})) AS h FROM capped GROUP BY _who),
        kept AS (SELECT _who FROM (SELECT _who, sum(n) OVER (ORDER BY h, _who ROWS UNBOUNDED PRECEDING) AS upto
                                   FROM sizes) {total})
        SELECT * EXCLUDE (_who, _nth) FROM capped WHERE _who IN (SELECT _who FROM kept)"""


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _sample_note(units: int, of: int, identities: int, of_identities: int) -> dict[str, Any]:
    return {"units": units, "of": of, "identities": identities, "of_identities": of_identities}


#: cross-fits per learned attacker with different fold assignments: each metric is the mean over
#: them (``<metric>_refit_std`` their spread), and the bootstrap interval cycles through them, so it
#: includes the fitting variance
REFITS = 5
#: the same for MLP attackers and the blind baseline (trees), whose fits cost 10-50× a logistic
#: one. Cross-fitted once, their intervals lacked the fitting variance: on the untrained demo audits
#: of seeds 0/1/2, 4 of 78 AUC intervals excluded 0.5, all MLP variants; with 3 refits none does,
#: and the demo's reduce went 15.1 -> 17.3 s (2-core VM, seed 0)
COSTLY_REFITS = 3


def _refits(model: str) -> int:
    return REFITS if model == "logistic" else COSTLY_REFITS


#: the level of members' training photos against the same people's other photos, and the key of
#: its entry under each image score in metrics.json
WITHIN = "image_within_identity"
WITHIN_KEY = "within_identity"


def _clusters(groups: np.ndarray, level: str) -> np.ndarray | None:
    """Image-level intervals resample whole identities; identity-level ones, identities."""
    return groups if level in ("image", WITHIN) else None


def _evaluate_fixed(name: str, score: np.ndarray, y: np.ndarray, level: str, roc_rows: list,
                    groups: np.ndarray, draws: np.ndarray | None = None) -> dict | None:
    keep = ~np.isnan(score)
    if keep.sum() < 2 or y[keep].all() or not y[keep].any():
        return None
    what = "the attack's own score, thresholded"
    if draws is not None:
        return {"level": level, "variant": "threshold", "what": what + ", on one draw per unit, averaged over draws",
                **_per_draw_metrics(name, draws[keep], y[keep], level, roc_rows)}
    m = membership_metrics(score[keep], y[keep], groups=_clusters(groups[keep], level))
    _roc_rows(roc_rows, name, level, "threshold", score[keep], y[keep])
    return {"level": level, "variant": "threshold", "what": what, **m}


def _per_draw_metrics(name: str, draws: np.ndarray, y: np.ndarray, level: str, roc_rows: list) -> dict:
    """Metrics of a score given per draw (units × draws): each metric is computed on every draw
    and averaged, with its spread over draws (``<metric>_draw_std``); the bootstrap interval
    resamples units and cycles through the draws, so it covers both. The ROC rows are the
    draw whose AUC is the median's."""
    sets = [draws[:, d] for d in range(draws.shape[1])]
    m = membership_metrics(sets[0], y, score_sets=sets, spread="draw")
    m["draws"] = len(sets)
    m["interval"] = m["interval"].replace(f"over {len(sets)} refits", f"cycling through the {len(sets)} draws")
    m["roc_draw"] = _median_set([auc(s, y) for s in sets])
    _roc_rows(roc_rows, name, level, "threshold", sets[m["roc_draw"]], y)
    return m


def _median_set(aucs: list[float]) -> int:
    """The score set (draw, refit) whose AUC is nearest the median: the one whose ROC is shown."""
    aucs = np.asarray(aucs)
    return int(np.argmin(np.abs(aucs - np.median(aucs))))


def _crossfit(X: np.ndarray, y: np.ndarray, groups: np.ndarray, learner: Learned
              ) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """Out-of-fold scores of a learned attacker, one vector per refit, with each row's fold id
    (nan and -1 for rows without features); None when it cannot be cross-fitted."""
    X = learner.prepare(X)
    keep = ~np.all(np.isnan(X), axis=1)
    if keep.sum() < 4 or y[keep].all() or not y[keep].any() or len(np.unique(groups[keep])) < 2:
        return None
    fits, folds = [], []
    for seed in range(_refits(learner.model)):
        f = crossfit_folds(y[keep], groups[keep], folds=5, seed=seed)
        s, ids = np.full(len(y), np.nan), np.full(len(y), -1)
        s[keep], ids[keep] = crossfit_proba(X[keep], y[keep], fold_ids=f, seed=seed, kind=learner.model), f
        fits.append(s)
        folds.append(ids)
    return fits, folds


def _evaluate_learned(name: str, fitted: tuple[list[np.ndarray], list[np.ndarray]], y: np.ndarray,
                      groups: np.ndarray, level: str, roc_rows: list, learner: Learned) -> dict | None:
    """Metrics of a cross-fitted attacker's scores (see :func:`_crossfit`), averaged over folds."""
    fits, folds = fitted
    keep = ~np.isnan(fits[0])
    if keep.sum() < 2 or y[keep].all() or not y[keep].any():
        return None
    fits, folds = [f[keep] for f in fits], [f[keep] for f in folds]
    m = membership_metrics(fits[0], y[keep], groups=_clusters(groups[keep], level), score_sets=fits, folds=folds)
    _refit_roc(m, roc_rows, name, level, learner.name, fits, y[keep], folds)
    return {"level": level, "variant": learner.name, "what": learner.what, **m}


def _refit_roc(m: dict, roc_rows: list, name: str, level: str, variant: str, fits: list[np.ndarray],
               y: np.ndarray, folds: list[np.ndarray]) -> None:
    """The ROC rows of the refit whose fold-averaged AUC is the median's (``roc_refit``)."""
    which = 0
    if len(fits) > 1:
        which = _median_set([membership_metrics(f, y, n_boot=0, folds=[i])["auc"] for f, i in zip(fits, folds)])
        m["roc_refit"] = which
    _roc_rows(roc_rows, name, level, variant, fits[which], y, folds[which])


def _subset(fitted: tuple[list[np.ndarray], list[np.ndarray]] | None, rows: np.ndarray | None):
    if fitted is None or rows is None:
        return fitted
    return [f[rows] for f in fitted[0]], [f[rows] for f in fitted[1]]


def _roc_rows(out: list, attack: str, level: str, variant: str, s: np.ndarray, y: np.ndarray,
              fold_ids: np.ndarray | None = None) -> None:
    """ROC rows; for cross-fitted scores (``fold_ids``) the curve averaged over folds."""
    roc = roc_curve(s, y) if fold_ids is None else fold_averaged_roc(s, y, fold_ids)
    for f, t, th in zip(roc.fpr, roc.tpr, roc.thresholds):
        out.append({"attack": attack, "level": level, "variant": variant, "fpr": float(f), "tpr": float(t),
                    "threshold": float(th)})


def evaluate(tables: list[Scored]) -> tuple[dict[str, Any], list[dict]]:
    """metrics.json content and ROC rows for every score at its level, plus the baseline."""
    metrics: dict[str, Any] = {}
    roc_rows: list[dict] = []
    baselines: dict[str, dict[str, Any]] = {}
    learned_of = {a.name: a.learned for a in registered() if a.features}
    within: dict[str, dict[str, Any]] = {}
    fitted: dict[tuple[str, str], Any] = {}  # (attack, variant) → the image level's cross-fitted scores
    for t in tables:
        entries = within if t.level == WITHIN else metrics
        estimates: list[tuple[dict, AucEstimate]] = []  # each entry and how its AUC is estimated
        for name, score in t.scores.items():
            d = t.draws.get(name)
            fixed = _evaluate_fixed(name, score, t.labels, t.level, roc_rows, t.groups, d)
            if fixed is None:
                continue
            estimates.append((fixed, AucEstimate([(score, None)] if d is None else
                                                 [(d[:, i], None) for i in range(d.shape[1])])))
            if name in learned_of and name in t.features:  # an attack's own score carries its learned variants
                for learner in learned_of[name]:
                    if t.rows is None:
                        fitted[name, learner.name] = _crossfit(t.features[name], t.labels, t.groups, learner)
                    found = _subset(fitted.get((name, learner.name)), t.rows)
                    learned = None if found is None else _evaluate_learned(name, found, t.labels, t.groups,
                                                                           t.level, roc_rows, learner)
                    if learned is not None:
                        fixed[learner.name] = learned
                        estimates.append((learned, AucEstimate(list(zip(*found)))))
            entries[name] = fixed
        level_metrics = [m for m in entries.values() if isinstance(m, dict) and m.get("level") == t.level]
        if BASELINE in t.features and level_metrics:
            if t.rows is None:
                inputs = (t.features[BASELINE], t.features.get(BASELINE_TEXT), t.labels, t.groups)
                fitted[BASELINE, "learned"] = validity.blind_scores(*inputs, COSTLY_REFITS,
                                                                    names=t.features.get(BASELINE_NAMES))
                fitted[BASELINE, "null"] = validity.blind_null_scores(
                    *inputs, validity.NULL_REPS, names=t.features.get(BASELINE_NAMES)) \
                    if len(np.unique(t.groups)) <= validity.NULL_MAX_GROUPS else None
            found = _subset(fitted.get((BASELINE, "learned")), t.rows)
            b = _blind_baseline(t, roc_rows, found, _subset(fitted.get((BASELINE, "null")), t.rows))
            if b is not None:
                b["best_attack_auc"] = max(_best_auc(m) for m in level_metrics)
                baselines[t.level] = b
                for m in level_metrics:
                    m["baseline_auc"] = b["auc"]
                base = AucEstimate(list(zip(*found)))
                for entry, est in estimates:
                    entry["vs_baseline"] = _versus(est, base, t)
    for name, entry in within.items():  # beside the image level, under each score
        if isinstance(metrics.get(name), dict):
            metrics[name][WITHIN_KEY] = entry
    if baselines:
        metrics[BASELINE] = {"auc": max(b["auc"] for b in baselines.values()),
                             "what": next(iter(baselines.values()))["what"],
                             "warning": any(b["warning"] for b in baselines.values()), "by_level": baselines}
    metrics["distribution_shift_warning"] = any(b["warning"] for b in baselines.values())
    metrics["shift_rule"] = validity.rule()
    metrics["evaluation_sample"] = {
        "per_identity": EVAL_PER_IDENTITY, "max_units": EVAL_MAX_UNITS,
        "levels": {t.level: t.sample for t in tables},
        "note": "metrics, learned attackers' cross-fits and the blind baseline use a seeded sample of the labelled "
                "units: at most per_identity images per identity (by a hash of shard, key and the job's seed; an "
                "identity's mean image features come from them), then whole identities in a seeded order up to "
                "max_units per level. An attack's own analyses beside its entry (e.g. a sweep over k) cover every "
                "labelled identity"}
    return metrics, roc_rows


def _versus(est: AucEstimate, base: AucEstimate, t: Scored) -> dict[str, Any]:
    """An entry's AUC minus the blind baseline's on the units both score, with the paired
    bootstrap interval (the shift check per attack: an interval above 0 is evidence beyond
    what the inputs alone show)."""
    both = np.ones(len(t.labels), dtype=bool)
    for s, _ in est.sets + base.sets:
        both &= ~np.isnan(s)
    y = t.labels[both]
    if y.all() or not y.any():
        return {"note": "the attack and the baseline share no scored units of both classes"}

    def cut(e: AucEstimate) -> AucEstimate:
        return AucEstimate([(s[both], None if f is None else f[both]) for s, f in e.sets])

    out = paired_auc_difference(cut(est), cut(base), y, groups=_clusters(t.groups[both], t.level))
    out["what"] = "AUC minus the blind baseline's on the same units, paired bootstrap 95 % interval"
    return out


def _blind_baseline(t: Scored, roc_rows: list, found: tuple[list[np.ndarray], list[np.ndarray]] | None,
                    null: tuple[list[np.ndarray], list[np.ndarray]] | None = None) -> dict[str, Any] | None:
    """The validity check at one level: the blind baseline's metrics (from its cross-fitted
    scores ``found``, :func:`validity.blind_scores`), its warning, and what it scores with inputs
    unrelated to the labels (``null``, :func:`validity.blind_null_scores`: mean and spread)."""
    text = t.features.get(BASELINE_TEXT)
    if found is None:
        return None
    fits, folds = found
    keep = ~np.isnan(fits[0])
    y = t.labels[keep]
    if y.all() or not y.any():
        return None
    fits, folds = [f[keep] for f in fits], [f[keep] for f in folds]
    m = membership_metrics(fits[0], y, groups=_clusters(t.groups[keep], t.level), score_sets=fits, folds=folds)
    _refit_roc(m, roc_rows, BASELINE, t.level, "learned", fits, y, folds)
    warn = m["auc_ci"] is not None and m["auc_ci"][0] > validity.SHIFT_FLOOR
    out = {"level": t.level, "variant": "learned",
           "what": validity.describe(text is not None, BASELINE_NAMES in t.features), **m, "warning": bool(warn)}
    null_aucs = []
    for s, f in zip(*(null or ([], []))):
        ok = ~np.isnan(s)
        if t.labels[ok].any() and not t.labels[ok].all():
            null_aucs.append(membership_metrics(s[ok], t.labels[ok], n_boot=0, folds=[f[ok]])["auc"])
    null_aucs = [a for a in null_aucs if a is not None and a == a]
    if null_aucs:
        out["null"] = {"auc_mean": float(np.mean(null_aucs)), "auc_sd": float(np.std(null_aucs, ddof=1))
                       if len(null_aucs) > 1 else None, "refits": len(null_aucs),
                       "what": "the baseline cross-fitted again on copies of its inputs unrelated to the labels "
                               "(each person's photos replaced by another's, people permuted at random): where "
                               "its AUC lies when there is no shift, and how far it strays by chance"}
    return out


def _best_auc(m: dict) -> float:
    """The best AUC of a score's entry: its fixed score or any learned variant."""
    vals = [m.get("auc", float("nan"))] + [v.get("auc", float("nan")) for v in m.values() if isinstance(v, dict)]
    vals = [v for v in vals if v == v]
    return max(vals) if vals else 0.0


# -- evaluation tables -------------------------------------------------------------

def _feature_columns(opts: ReduceOptions) -> dict[str, str]:
    """Feature key → samples column: each enabled attack's feature vector, plus the baseline's."""
    out = {a.name: a.features for a in registered() if a.name in opts.enabled and a.features}
    return {**out, BASELINE: "baseline_features"}


def identity_table(con: duckdb.DuckDBPyConnection, identities: pa.Table, opts: ReduceOptions,
                   excluded: dict[str, set[str]] | None = None,
                   draws: dict[str, dict[str, np.ndarray]] | None = None,
                   pool: set[str] | None = None) -> Scored | None:
    """Labelled identities with their identity-level and mean image scores and mean features;
    ``excluded``: per attack, identities left out of its scores (nan); ``draws``: per metric
    column, each identity's per-draw values (the score then has them, nan rows where missing);
    ``pool``: the name pool, for how common each name is (None: the labelled names alone)."""
    rows = [r for r in identities.to_pylist() if r["label_member"] is not None and r["n_images"]]
    if not rows:
        return None
    n_labelled = len(rows)
    if len(rows) > EVAL_MAX_UNITS:  # the seeded sample of identities (the same order as capped_sql's)
        order = sorted(rows, key=lambda r: (_md5(f"{r['identity']}\0{opts.seed}"), r["identity"]))
        keep = {r["identity"] for r in order[:EVAL_MAX_UNITS]}
        rows = [r for r in rows if r["identity"] in keep]
    names = [r["identity"] for r in rows]
    attack_of = {s.name: a.name for a in registered() for s in a.scores}
    table_scores, score_draws = {}, {}
    for s in scores(opts.enabled):  # the score's metric column (e.g. at a fixed k), else its all-image score
        values = [r.get(s.metric) for r in rows]
        on_metric = any(v is not None for v in values)
        if not on_metric:
            values = [r[f"{s.name}_score"] for r in rows]
        left_out = (excluded or {}).get(attack_of[s.name], set())
        table_scores[s.name] = float_vector([None if n in left_out else v for n, v in zip(names, values)])
        by_name = (draws or {}).get(s.metric)
        if by_name and on_metric:  # the metric column is a mean over draws: its draws go with it
            width = len(next(iter(by_name.values())))
            score_draws[s.name] = np.stack([by_name.get(n, np.full(width, np.nan)) if n not in left_out
                                            else np.full(width, np.nan) for n in names]).astype(float)
    con.register("labelled_names", pa.table({"identity": names}))
    feats = _feature_columns(opts)
    images = capped_sql(f"SELECT identity, shard, key, position, {', '.join(feats.values())}, caption FROM ok "
                        "WHERE identity IN (SELECT identity FROM labelled_names)", opts.seed, EVAL_PER_IDENTITY, None)
    per_image = con.sql(f"SELECT * FROM ({images}) ORDER BY identity, shard, position").to_arrow_table()
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
    features[BASELINE_NAMES] = validity.name_features(names, sorted(pool) if pool else None)
    y = np.array([r["label_member"] for r in rows], dtype=bool)
    return Scored("identity", y, np.arange(len(rows)), table_scores, features, score_draws,
                  sample=_sample_note(len(rows), n_labelled, len(rows), n_labelled))


def image_table(con: duckdb.DuckDBPyConnection, labels: Labels, opts: ReduceOptions) -> Scored | None:
    """Labelled images (image rows of the labels file) with their image-level scores and features."""
    image = [s.name for s in scores(opts.enabled, "image")]
    if not labels.images or not image:
        return None
    lab = pa.table({"shard": [k[0] for k in labels.images], "key": [k[1] for k in labels.images],
                    "member": list(labels.images.values())})
    con.register("image_labels", lab)
    feats = _feature_columns(opts)
    cols = ", ".join([f"ok.{a}_score" for a in image] + [f"ok.{c}" for c in feats.values()] + ["ok.caption"])
    matched = f"""SELECT ok.identity, ok.shard, ok.key, ok.position, l.member, {cols} FROM ok JOIN image_labels l
                  ON l.key = ok.key AND l.shard = ok.shard"""
    [(n_rows, n_identities)] = con.sql(
        f"SELECT count(*), count(DISTINCT coalesce(identity, '')) FROM ({matched})").fetchall()
    if not n_rows:
        log.warning("labels: no image row matched a sample (rows match by shard and key)")
        return None
    # a fixed order: folds and resamples depend on it
    sample = capped_sql(matched, opts.seed, EVAL_PER_IDENTITY, EVAL_MAX_UNITS)
    data = con.sql(f"SELECT * FROM ({sample}) ORDER BY shard, position").to_arrow_table()
    groups = np.unique(np.array(data.column("identity").to_pylist(), dtype=object), return_inverse=True)[1]
    table_scores = {a: float_vector(data.column(f"{a}_score")) for a in image}
    features = {key: feature_matrix(data.column(col)) for key, col in feats.items()}
    member = data.column("member").to_numpy(zero_copy_only=False).astype(bool)
    text = validity.text_features(data.column("caption").to_pylist(), data.column("identity").to_pylist())
    if text is not None:
        features[BASELINE_TEXT] = text
    return Scored("image", member, groups, table_scores, features,
                  sample=_sample_note(data.num_rows, int(n_rows), int(groups.max()) + 1, int(n_identities)))


def evaluation_tables(con: duckdb.DuckDBPyConnection, identities: pa.Table, labels: Labels,
                      opts: ReduceOptions, excluded: dict[str, set[str]] | None = None,
                      draws: dict[str, dict[str, np.ndarray]] | None = None,
                      pool: set[str] | None = None) -> list[Scored]:
    """The identity-level table and, with image labels, the image-level one — which then
    replaces the identity level for image-level scores — and the within-identity one."""
    ident, image = identity_table(con, identities, opts, excluded, draws, pool), image_table(con, labels, opts)
    if ident is not None and image is not None:
        for s in scores(opts.enabled, "image"):
            ident.scores.pop(s.name, None)
            ident.features.pop(s.name, None)
    return [t for t in (ident, image, within_identity(image)) if t is not None]


def within_identity(image: Scored | None) -> Scored | None:
    """The image table cut to the identities with both member and non-member images: "was
    *this* photo used?" — a member's training photos against the same person's other photos,
    so whether the person is a member plays no part. Learned attackers keep their image-level
    fits (fitted on other identities' folds), evaluated on these rows. None without two such
    identities."""
    if image is None:
        return None
    has_member = np.bincount(image.groups, weights=image.labels.astype(float)) > 0
    has_other = np.bincount(image.groups, weights=(~image.labels).astype(float)) > 0
    both = (has_member & has_other)[image.groups]
    if len(np.unique(image.groups[both])) < 2:
        return None
    groups = np.unique(image.groups[both], return_inverse=True)[1]
    return Scored(WITHIN, image.labels[both], groups,
                  {k: v[both] for k, v in image.scores.items()}, {k: v[both] for k, v in image.features.items()},
                  rows=np.flatnonzero(both), sample={"units": int(both.sum()), "identities": int(groups.max()) + 1,
                                                     "cut_from": "the image level's sample"})


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
