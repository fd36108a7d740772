"""Membership metrics: ROC, AUC, TPR at low FPR, and bootstrap intervals.

Conventions: a higher score means "more member-like"; members are positives. TPR at a
target FPR is the best TPR over thresholds whose FPR does not exceed the target — with
few non-members that means no false positive at all, which is the honest reading.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np


def float_vector(values) -> np.ndarray:
    """A list (None → nan) or a numeric Arrow column (null → nan) as a float vector."""
    if hasattr(values, "to_numpy"):
        return values.to_numpy(zero_copy_only=False).astype(float)
    return np.array([np.nan if v is None else v for v in values], dtype=float)


@dataclass(frozen=True)
class Roc:
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> Roc:
    """ROC points over all distinct thresholds (score >= threshold → member), from (0,0)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[distinct]
    fp = np.cumsum(~y)[distinct]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return Roc(
        fpr=np.r_[0.0, fp / n_neg], tpr=np.r_[0.0, tp / n_pos], thresholds=np.r_[np.inf, s[distinct]]
    )


def fold_averaged_roc(scores: np.ndarray, labels: np.ndarray, fold_ids: np.ndarray) -> Roc:
    """The ROC of cross-fitted scores averaged vertically over folds: at each FPR, the mean over
    folds of the best TPR at that FPR or below (folds lacking a class are skipped). A threshold
    means nothing across folds (each has its own model), so the thresholds are nan."""
    scores, labels, fold_ids = (np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool),
                                np.asarray(fold_ids))
    curves = [roc_curve(scores[fold_ids == f], labels[fold_ids == f]) for f in np.unique(fold_ids)
              if labels[fold_ids == f].any() and not labels[fold_ids == f].all()]
    if not curves:
        return roc_curve(scores, labels)
    grid = np.unique(np.concatenate([c.fpr for c in curves]))
    # tpr is non-decreasing in fpr, so the best TPR at FPR <= x is the last point at or before x
    tpr = np.mean([c.tpr[np.searchsorted(c.fpr, grid, side="right") - 1] for c in curves], axis=0)
    return Roc(fpr=grid, tpr=tpr, thresholds=np.full(len(grid), np.nan))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(member score > non-member score), ties count half."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks for ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, max_fpr: float) -> float:
    roc = roc_curve(scores, labels)
    ok = roc.fpr <= max_fpr + 1e-12
    return float(roc.tpr[ok].max()) if ok.any() else 0.0


def _point(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "auc": auc(scores, labels),
        "tpr_at_1pct_fpr": tpr_at_fpr(scores, labels, 0.01),
        "tpr_at_0_1pct_fpr": tpr_at_fpr(scores, labels, 0.001),
    }


class _Resampler:
    """Metrics of bootstrap resamples in O(n) each: the scores are sorted once, and a resample
    is a count per unit (how often it was drawn), summed per distinct score."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray) -> None:
        order = np.argsort(-scores, kind="mergesort")
        s = scores[order]
        self.order, self.y = order, labels[order]
        self.pos_at, self.neg_at = np.nonzero(self.y)[0], np.nonzero(~self.y)[0]  # places in sorted order
        self.starts = np.r_[0, np.nonzero(np.diff(s))[0] + 1]  # first index of each distinct score
        self.ties = len(self.starts) < len(s)

    def point(self, counts: np.ndarray) -> dict[str, float]:
        """Metrics of the resample that draws unit i ``counts[i]`` times (original order)."""
        c = counts[self.order].astype(np.float64)
        return self._metrics(c * self.y, c * ~self.y)

    def draw(self, rng: np.random.Generator) -> dict[str, float]:
        """Metrics of one stratified resample: members and non-members each drawn with replacement."""
        tp_g = np.zeros(len(self.y))
        fp_g = np.zeros(len(self.y))
        tp_g[self.pos_at] = np.bincount(rng.integers(0, len(self.pos_at), len(self.pos_at)),
                                        minlength=len(self.pos_at))
        fp_g[self.neg_at] = np.bincount(rng.integers(0, len(self.neg_at), len(self.neg_at)),
                                        minlength=len(self.neg_at))
        return self._metrics(tp_g, fp_g)

    def points(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`point` of many resamples at once: one row of ``counts`` per resample; nan where
        a resample lacks a class."""
        c = counts[:, self.order].astype(np.float64)
        tp_g, fp_g = c * self.y, c * ~self.y
        if self.ties:
            tp_g, fp_g = np.add.reduceat(tp_g, self.starts, axis=1), np.add.reduceat(fp_g, self.starts, axis=1)
        tp, fp = np.cumsum(tp_g, axis=1), np.cumsum(fp_g, axis=1)
        p, n = tp[:, -1], fp[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {"auc": np.einsum("ij,ij->i", fp_g, tp - tp_g / 2.0) / (p * n)}
            rows = np.arange(len(c))
            for key, f in (("tpr_at_1pct_fpr", 0.01), ("tpr_at_0_1pct_fpr", 0.001)):
                k = (fp / n[:, None] <= f + 1e-12).sum(axis=1)  # fp is non-decreasing along each row
                out[key] = np.where(k > 0, tp[rows, np.maximum(k - 1, 0)] / p, 0.0)
            bad = (p == 0) | (n == 0)
        return {key: np.where(bad, np.nan, v) for key, v in out.items()}

    def _metrics(self, tp_g: np.ndarray, fp_g: np.ndarray) -> dict[str, float]:
        if self.ties:  # sum per distinct score (continuous scores: every group is one unit)
            tp_g, fp_g = np.add.reduceat(tp_g, self.starts), np.add.reduceat(fp_g, self.starts)
        tp, fp = np.cumsum(tp_g), np.cumsum(fp_g)
        p, n = tp[-1], fp[-1]
        out = {"auc": float(np.dot(fp_g, tp - tp_g / 2.0) / (p * n))}
        for key, f in (("tpr_at_1pct_fpr", 0.01), ("tpr_at_0_1pct_fpr", 0.001)):
            k = _prefix_within(fp, n, f + 1e-12)
            out[key] = float(tp[k - 1] / p) if k else 0.0
        return out


class _FoldAveraged:
    """Metrics of cross-fitted scores as the mean over folds of each fold's own metrics: a
    fold's scores come from one fitted model, so their ranks are comparable, while pooled
    out-of-fold scores mix differently calibrated models whose training class shares move
    against their test shares — which biases a pooled AUC below 0.5 when there is no signal."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray, fold_ids: np.ndarray) -> None:
        self.parts = []
        for f in np.unique(fold_ids):
            idx = np.flatnonzero(fold_ids == f)
            if labels[idx].any() and not labels[idx].all():  # a fold needs both classes for any metric
                self.parts.append((idx, labels[idx], _Resampler(scores[idx], labels[idx])))

    def point(self, counts: np.ndarray) -> dict[str, float] | None:
        """Fold-averaged metrics of a resample (unit i drawn ``counts[i]`` times); None when no
        fold has both classes in it."""
        found = [r.point(counts[idx]) for idx, y, r in self.parts if (counts[idx] * y).any()
                 and (counts[idx] * ~y).any()]
        if not found:
            return None
        return {k: float(np.mean([d[k] for d in found])) for k in found[0]}

    def points(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`point` of many resamples at once (a row of ``counts`` each); nan where no fold
        has both classes."""
        per = [r.points(counts[:, idx]) for idx, _, r in self.parts]
        with warnings.catch_warnings():  # a resample where no fold has both classes: nan, skipped
            warnings.simplefilter("ignore", RuntimeWarning)
            return {k: np.nanmean(np.stack([d[k] for d in per]), axis=0) for k in per[0]}


#: bootstrap counts held at once by the vectorised fold-averaged bootstrap (resamples × units)
BOOT_CELLS = 2_000_000


def _count_chunks(rng: np.random.Generator, n_boot: int, labels: np.ndarray, codes: np.ndarray | None,
                  strata: list[np.ndarray] | None):
    """Bootstrap resamples as count rows (how often each unit is drawn), in chunks of at most
    :data:`BOOT_CELLS` cells: (first resample's number, counts, whether each has both classes).
    Units are drawn within members and within non-members, or whole groups (``codes``) within
    ``strata`` (see :func:`_cluster_counts`)."""
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    chunk = max(1, BOOT_CELLS // max(len(labels), 1))
    for start in range(0, n_boot, chunk):
        counts = np.zeros((min(chunk, n_boot - start), len(labels)))
        for b in range(len(counts)):
            if codes is None:
                counts[b, pos] = np.bincount(rng.integers(0, len(pos), len(pos)), minlength=len(pos))
                counts[b, neg] = np.bincount(rng.integers(0, len(neg), len(neg)), minlength=len(neg))
            else:
                counts[b] = _cluster_counts(rng, codes, strata)
        yield start, counts, (counts @ labels > 0) & (counts @ ~labels > 0)


@dataclass(frozen=True)
class AucEstimate:
    """How one variant's AUC is estimated: the mean over ``sets`` (e.g. draws, refits; one for
    most) of each set's AUC, computed within each fold and averaged where the set has fold ids."""

    sets: list[tuple[np.ndarray, np.ndarray | None]]  # (scores, fold ids or None)

    def _auc(self, i: int, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
        s, f = self.sets[i]
        return (_Resampler(s, labels) if f is None else _FoldAveraged(s, labels, f)).points(counts)["auc"]

    def point(self, labels: np.ndarray) -> float:
        """The estimate on the data itself: the mean of the sets' AUCs."""
        ones = np.ones((1, len(labels)))
        return float(np.mean([self._auc(i, labels, ones)[0] for i in range(len(self.sets))]))

    def resampled(self, labels: np.ndarray, counts: np.ndarray, first: int = 0) -> np.ndarray:
        """The AUC of each resample (a row of ``counts``; row r is resample ``first + r``), each
        on one set, cycling through them as :func:`membership_metrics` does."""
        which = (first + np.arange(len(counts))) % len(self.sets)
        out = np.full(len(counts), np.nan)
        for i in np.unique(which):
            out[which == i] = self._auc(int(i), labels, counts[which == i])
        return out


def paired_auc_difference(a: AucEstimate, b: AucEstimate, labels: np.ndarray, groups: np.ndarray | None = None,
                          n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """AUC(a) − AUC(b) on the same units with its 95 % paired bootstrap interval: every
    resample draws the same units (whole groups where given) for both, so what they share
    cancels and the interval is that of the difference itself."""
    labels = np.asarray(labels, dtype=bool)
    point = a.point(labels) - b.point(labels)
    codes, strata = _group_strata(groups, labels)
    diffs: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    used = 0  # resamples with both classes so far: each estimate cycles through its sets over them
    for _, counts, ok in _count_chunks(rng, n_boot, labels, codes, strata):
        rows = counts[ok]
        d = a.resampled(labels, rows, used) - b.resampled(labels, rows, used)
        used += len(rows)
        diffs.append(d[~np.isnan(d)])
    d = np.concatenate(diffs) if diffs else np.empty(0)
    ci = [float(x) for x in np.percentile(d, [2.5, 97.5])] if len(d) else None
    return {"auc_difference": point, "auc_difference_ci": ci}


def _fold_boots(boots: dict[str, list[float]], averaged: list[_FoldAveraged], rng: np.random.Generator,
                n_boot: int, labels: np.ndarray, codes: np.ndarray | None, strata: list[np.ndarray] | None) -> None:
    """Append the fold-averaged metrics of ``n_boot`` resamples to ``boots``; resample b uses
    score set b mod len(averaged). Units are drawn within members and non-members, or whole
    groups within ``strata`` (see :func:`_cluster_counts`); a resample without both classes is
    skipped."""
    for start, counts, ok in _count_chunks(rng, n_boot, labels, codes, strata):
        which = (start + np.arange(len(counts))) % len(averaged)
        for i, a in enumerate(averaged):
            rows = np.flatnonzero(ok & (which == i))
            if len(rows):
                for key, vals in a.points(counts[rows]).items():
                    boots[key].extend(float(v) for v in vals[~np.isnan(vals)])


def _prefix_within(fp: np.ndarray, n: float, limit: float) -> int:
    """Length of the prefix of non-decreasing ``fp`` with ``fp / n <= limit`` (same rounding as
    dividing every element), found by binary search instead of a pass over all of them."""
    k = int(np.searchsorted(fp, limit * n, side="right"))
    while k > 0 and fp[k - 1] / n > limit:
        k -= 1
    while k < len(fp) and fp[k] / n <= limit:
        k += 1
    return k


#: the low false-positive rates reported, by key
TARGET_FPRS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0_1pct_fpr": 0.001}


def unresolvable(n_nonmembers: int, unit: str = "non-members", why: str = "") -> dict[str, str]:
    """Notes for the TPRs at a target FPR that ``n_nonmembers`` cannot resolve: below 1/FPR
    non-members, one false positive already exceeds the target, so the TPR there only says
    "no false positive at all" — not a rate at that FPR. ``unit``/``why``: what is counted (at
    image level, non-member identities: the effective sample size of clustered images)."""
    out = {}
    for key, f in TARGET_FPRS.items():
        need = int(round(1 / f))
        if n_nonmembers < need:
            out[key] = f"needs >= {need} {unit} at this level, has {n_nonmembers}{why}"
    return out


def _group_strata(groups: np.ndarray | None, labels: np.ndarray
                  ) -> tuple[np.ndarray | None, list[np.ndarray] | None]:
    """For a cluster bootstrap: each unit's group code and the groups with and without a member
    unit (the strata whole groups are drawn within); (None, None) without groups."""
    if groups is None:
        return None, None
    codes = np.unique(np.asarray(groups), return_inverse=True)[1]
    has_member = np.bincount(codes, weights=labels.astype(float)) > 0
    return codes, [np.flatnonzero(has_member), np.flatnonzero(~has_member)]


def _cluster_counts(rng: np.random.Generator, groups: np.ndarray, strata: list[np.ndarray]) -> np.ndarray:
    """How often each unit is drawn when whole groups are resampled with replacement within
    each stratum of groups."""
    g_counts = np.zeros(int(groups.max()) + 1)
    for members in strata:
        if len(members):
            g_counts[members] += np.bincount(rng.integers(0, len(members), len(members)), minlength=len(members))
    return g_counts[groups]


def membership_metrics(scores: np.ndarray, labels: np.ndarray, n_boot: int = 1000, seed: int = 0,
                       groups: np.ndarray | None = None, score_sets: list[np.ndarray] | None = None,
                       folds: list[np.ndarray] | None = None, spread: str = "refit") -> dict:
    """Point estimates plus bootstrap 95 % percentile intervals, reported as computed.

    Resampling: without ``groups``, units (e.g. identities) are drawn with replacement within
    members and within non-members; with ``groups`` (e.g. the identity of each image), whole
    groups are drawn, stratified by whether the group has a member unit, and each unit keeps its
    own label — images of one person are not independent, so this is the honest interval.
    ``score_sets``: every score vector for the same units (e.g. a learned attacker refitted with
    other fold assignments, ``scores`` being the first): each metric is the mean of the sets'
    metrics, with their spread as ``<metric>_<spread>_std``, and resample b uses set b mod len,
    so the interval also covers the fitting variance. A TPR at a target FPR that the non-members
    cannot resolve is None, with a ``…_note`` (see :func:`unresolvable`). Each resample costs
    one pass over the sorted scores, so 1,000 resamples of a million images take seconds.
    ``folds``: for cross-fitted scores, the fold id of each unit (one array per score set):
    every metric is then computed within each fold and averaged over folds (see
    :class:`_FoldAveraged`), and the 1/FPR rule counts the non-members of the smallest fold.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    out: dict = {"n_members": int(labels.sum()), "n_nonmembers": int((~labels).sum())}
    sets = [np.asarray(s, dtype=np.float64) for s in (score_sets or [scores])]
    averaged = [_FoldAveraged(s, labels, np.asarray(f)) for s, f in zip(sets, folds)] if folds else None
    if averaged:
        per = [p for p in (a.point(np.ones(len(labels))) for a in averaged) if p is not None]
        out["averaged_over_folds"] = len(averaged[0].parts)
    else:
        per = [_point(s, labels) for s in sets]
    point = {k: float(np.mean([p[k] for p in per])) for k in per[0]} if per else _point(scores, labels)
    g = None if groups is None else np.asarray(groups)
    if g is not None:  # images of one person are not independent: the 1/FPR rule counts the non-member people
        out["n_nonmember_groups"] = int(len(np.unique(g[~labels])))
    resolving = out["n_nonmembers"] if g is None else out["n_nonmember_groups"]
    per_fold = ""
    if averaged and averaged[0].parts:  # each fold's rates are measured on that fold's non-members alone
        resolving = min(len(np.unique(idx[~y] if g is None else g[idx[~y]])) for idx, y, _ in averaged[0].parts)
        per_fold = " per fold (the smallest cross-fitting fold; each metric is averaged over the folds)"
    if g is None:
        notes = unresolvable(resolving, why=per_fold)
    else:
        notes = unresolvable(resolving, "non-member identities",
                             f"{per_fold} (among {out['n_nonmembers']} non-member images; images of one person "
                             "are not independent)")
    out.update(point)
    if len(per) > 1:  # the spread of the point estimate over the score sets (refits, draws)
        out.update({f"{k}_{spread}_std": float(np.std([p[k] for p in per])) for k in point if k not in notes})
    for key, note in notes.items():
        out[key], out[f"{key}_note"] = None, note
    if labels.all() or not labels.any():
        return out
    rng = np.random.default_rng(seed)
    codes, strata = _group_strata(groups, labels)
    boots: dict[str, list[float]] = {k: [] for k in point}
    if averaged is not None:  # all resamples' counts at once, metrics vectorised over resamples per fold
        _fold_boots(boots, averaged, rng, n_boot, labels, codes, strata)
    else:
        resamplers = [_Resampler(s, labels) for s in sets]
        for b in range(n_boot):
            r = resamplers[b % len(resamplers)]
            if codes is None:
                draw = r.draw(rng)
            else:
                counts = _cluster_counts(rng, codes, strata)
                if not (counts * labels).any() or not (counts * ~labels).any():
                    continue  # a resample without one of the classes has no metrics
                draw = r.point(counts)
            for k, v in draw.items():
                boots[k].append(v)
    for k, vals in boots.items():
        if k in notes or not vals:
            out[f"{k}_ci"] = None
        else:
            out[f"{k}_ci"] = [float(x) for x in np.percentile(vals, [2.5, 97.5])]
    out["interval"] = ("bootstrap percentile, 95 %, " + ("whole identities resampled" if groups is not None else
                                                          "units resampled within members and non-members")
                       + (f", over {len(sets)} refits" if len(sets) > 1 else "")
                       + (", each metric averaged over the cross-fitting folds" if averaged else ""))
    return out
