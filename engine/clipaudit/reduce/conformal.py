"""Conformal calibration against known non-members ("controls").

Every score gets an empirical p-value among the controls' scores,
p = (1 + #{controls >= s}) / (1 + n) — a control itself is compared with the *other*
controls only — and a flag ``p <= target_fpr``, which a new non-member drawn like the
controls trips with probability at most ``target_fpr``. The equivalent score thresholds,
with what the number of controls can and cannot support, go to ``calibration.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clipaudit.core.statistics import float_vector
from clipaudit.reduce.attackers import ok_rows
from clipaudit.reduce.neighbours import Copies

if TYPE_CHECKING:
    import pyarrow as pa

    from clipaudit.io.outputs import OutputLayout
    from clipaudit.reduce.attackers import LearnedScores
    from clipaudit.data.labels import Controls
    from clipaudit.reduce.neighbours import Copies


def _controls(control_scores: np.ndarray) -> np.ndarray:
    """Sorted (ascending) finite control scores; raises on none or non-finite."""
    c = np.asarray(control_scores, dtype=np.float64).ravel()
    if c.size == 0:
        raise ValueError("no control scores")
    if not np.isfinite(c).all():
        raise ValueError("control scores must be finite")
    return np.sort(c)


def empirical_pvalues(scores: np.ndarray, control_scores: np.ndarray) -> np.ndarray:
    """Conformal p-values p = (1 + #{control >= s}) / (1 + n_control); NaN scores -> NaN."""
    return pvalues_sorted(scores, _controls(control_scores))


def pvalues_sorted(scores: np.ndarray, controls_sorted: np.ndarray, own: np.ndarray | None = None) -> np.ndarray:
    """:func:`empirical_pvalues` against controls already sorted ascending. Where ``own`` is
    true the score is itself one of the controls and is compared with the others only:
    (1 + #{others >= s}) / (1 + n - 1) = #{controls >= s} / n."""
    c = controls_sorted
    s = np.asarray(scores, dtype=np.float64)
    at_least = c.size - np.searchsorted(c, s, side="left")
    p = (1.0 + at_least) / (1.0 + c.size)
    if own is not None:
        p = np.where(own, at_least / c.size, p)
    return np.where(np.isnan(s), np.nan, p)


def conformal_threshold(control_scores: np.ndarray, alpha: float) -> float:
    """The score threshold equivalent to ``empirical_pvalues(s) <= alpha``: flag ``s >= t``.

    A new non-member exchangeable with the controls is flagged with probability <= alpha.
    +inf when alpha < 1 / (n + 1) (too few controls to flag anything at that rate).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    c = _controls(control_scores)
    n = c.size
    k = int(np.floor(alpha * (n + 1) + 1e-9)) - 1  # controls allowed at or above the threshold
    if k < 0:
        return float(np.inf)
    if k >= n:
        return float(-np.inf)
    return float(np.nextafter(c[n - 1 - k], np.inf))


def pvalues(scores: np.ndarray, is_control: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p-values, sorted control scores) when the controls are among ``scores``."""
    s = np.asarray(scores, dtype=float)
    c = np.sort(s[is_control & ~np.isnan(s)])
    return pvalues_against(s, is_control, c), c


def pvalues_against(scores: np.ndarray, is_control: np.ndarray, controls_sorted: np.ndarray) -> np.ndarray:
    """p = (1 + #{controls >= s}) / (1 + n); a control leaves itself out. NaN where the score
    is NaN or there are fewer than 2 controls."""
    s = np.asarray(scores, dtype=float)
    if controls_sorted.size < 2:
        return np.full(s.shape, np.nan)
    return pvalues_sorted(s, controls_sorted, own=is_control & ~np.isnan(s))


def threshold_entry(controls_sorted: np.ndarray, n_scored: int, flagged: int, controls_flagged: int,
                    target_fpr: float, control_groups: int | None = None) -> dict[str, Any]:
    """What calibration.json says about one score at one level.

    ``n_scored``/``flagged`` count the non-control units; ``controls_flagged`` counts controls
    whose leave-one-out p-value is <= target_fpr (an estimate of the false-positive rate).
    ``control_groups``: distinct identities among image controls (images of one person are
    not independent draws).
    """
    n = int(controls_sorted.size)
    entry: dict[str, Any] = {"n_controls": n, "n_scored": n_scored}
    if control_groups is not None:
        entry["control_identities"] = control_groups
    if n < 2:
        entry["note"] = "fewer than 2 controls: no calibration"
        return entry
    t = conformal_threshold(controls_sorted, target_fpr)
    entry.update(
        threshold=None if math.isinf(t) else t,
        min_attainable_fpr=1.0 / (n + 1),
        flagged=flagged,
        controls_flagged_leave_one_out=controls_flagged,
        controls_fpr_leave_one_out=controls_flagged / n,
    )
    notes = []
    if math.isinf(t) and t > 0:
        notes.append(f"{n} controls cannot support a false-positive rate of {target_fpr}: "
                     f"at least {math.ceil(1 / target_fpr) - 1} are needed; nothing is flagged")
    if control_groups is not None and control_groups < n and control_groups < math.ceil(1 / target_fpr) - 1:
        notes.append(f"the {n} control images come from only {control_groups} identities: the p-values treat "
                     "images as independent, so images of a new non-member identity may be flagged more often "
                     "than the target rate; add control identities")
    if notes:
        entry["note"] = "; ".join(notes)
    return entry


def as_column(p: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in p]


def flag_column(p: np.ndarray, target_fpr: float) -> list[bool | None]:
    return [None if np.isnan(v) else bool(v <= target_fpr) for v in p]


class DiscoveryCounter:
    """Benjamini–Hochberg q-values over the candidate (non-control) units, built from counts.

    Conformal p-values take few distinct values (at most one more than the controls), so the
    candidates' p-values are counted per distinct value and the q-value of each value computed
    from the counts: exact BH (ties share the q-value of the last of them, as in the textbook
    step-up), in memory that does not grow with the number of candidates — the image level can
    be counted part by part and written in a later pass."""

    def __init__(self) -> None:
        self._counts: dict[float, int] = {}

    def add(self, p: np.ndarray, candidate: np.ndarray) -> None:
        p = np.asarray(p, dtype=float)
        keep = candidate & ~np.isnan(p)
        values, counts = np.unique(p[keep], return_counts=True)
        for v, n in zip(values.tolist(), counts.tolist()):
            self._counts[v] = self._counts.get(v, 0) + n

    def qvalues(self, p: np.ndarray, candidate: np.ndarray) -> np.ndarray:
        """The q-value of each candidate's p-value (nan for controls and missing p-values)."""
        p = np.asarray(p, dtype=float)
        out = np.full(p.shape, np.nan)
        if not self._counts:
            return out
        levels = np.array(sorted(self._counts))
        ranks = np.cumsum([self._counts[v] for v in levels])  # candidates with p <= level
        q = np.minimum(1.0, levels * ranks[-1] / ranks)
        q = np.minimum.accumulate(q[::-1])[::-1]  # step-up: the smallest q at this level or above
        keep = candidate & ~np.isnan(p)
        out[keep] = q[np.searchsorted(levels, p[keep])]
        return out


def bh_qvalues(p: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values of ``p`` over the ``candidate`` units (nan elsewhere)."""
    counter = DiscoveryCounter()
    counter.add(p, candidate)
    return counter.qvalues(p, candidate)


def cauchy_combination(pvalue_columns: list[np.ndarray]) -> np.ndarray:
    """Per unit, one p-value from several (the Cauchy combination test, Liu & Xie 2020): the mean
    of tan((0.5 - p)·π) over the unit's non-missing p-values, turned back into a p-value. Valid
    under arbitrary dependence between the p-values in the tail that matters (small p), which
    scores of one identity computed from the same images have; nan where a unit has none."""
    P = np.clip(np.column_stack(pvalue_columns), 1e-300, 1.0)
    have = ~np.isnan(P)
    n = have.sum(axis=1)
    t = np.where(have, np.tan((0.5 - np.where(have, P, 0.5)) * np.pi), 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        stat = t / n
    return np.where(n > 0, 0.5 - np.arctan(stat) / np.pi, np.nan)


def discovery_entry(discoveries: int, fdr: float) -> dict[str, Any]:
    """calibration.json's discovery figures of one score: how many candidates have q <= fdr and
    how many of those are expected to be false (at most fdr of them, in expectation)."""
    return {"fdr": fdr, "discoveries": discoveries, "expected_false_discoveries": round(fdr * discoveries, 3)}


@dataclass
class IdentityPValues:
    """One score's identity-level calibration: the ``calibration.json`` entry and, with at
    least 2 controls, the p-value and flag columns."""

    entry: dict[str, Any]
    pvalues: list[float | None] | None = None
    flags: list[bool | None] | None = None


def count_matched_pvalues(values: np.ndarray, counts: np.ndarray, is_control: np.ndarray,
                          control_images: dict[int, np.ndarray], seed: int = 0) -> np.ndarray:
    """P-values of per-identity means of image scores, each identity compared with the controls
    *at its own number of images*: against every control's mean over a random subset of that
    many of its images (all its images where it has no more).

    A mean over 3 images varies more than one over 50, so comparing it with full-count control
    means flags small non-member identities far above the target rate; a control's random
    n-subset is drawn like a candidate with n images, so the p-value is valid again (conservative
    where a control has fewer than n images). Each control's images are put in one random order
    (seeded per control), and its subset of n is the first n of them: the means at every n come
    from one cumulative sum, so the cost is one pass over the controls' images plus a vectorised
    lookup per distinct count, not a random draw per control and count. ``control_images``:
    row → that control's image scores. nan where the value is nan or fewer than 2 controls have
    images; ``counts`` may hold None for an identity without an ok image (its value is nan too)."""
    v = np.asarray(values, dtype=float)
    n = np.array([0 if c is None else c for c in counts], dtype=np.int64)  # None: no ok image
    out = np.full(len(v), np.nan)
    ctrl = [int(i) for i in np.flatnonzero(is_control & ~np.isnan(v)) if len(control_images.get(int(i), ())) > 0]
    if len(ctrl) < 2:
        return out
    sizes = np.array([len(control_images[c]) for c in ctrl])
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    # per control, the running mean of its images in a seeded random order (first k = a random k-subset)
    running = np.concatenate([np.cumsum(np.random.default_rng([seed, c]).permutation(control_images[c]))
                              / np.arange(1, len(control_images[c]) + 1) for c in ctrl])
    whole = v[ctrl]  # a control with no more than k images enters with its own value (exactly the displayed one)
    for k in np.unique(n[~np.isnan(v)]):
        rows = np.flatnonzero((n == k) & ~np.isnan(v))
        stats = np.where(sizes <= k, whole, running[starts + np.minimum(k, sizes) - 1])
        out[rows] = pvalues_sorted(v[rows], np.sort(stats), own=is_control[rows])
    return out


def identity_pvalues(values: list | None, is_control: np.ndarray, target_fpr: float,
                     matched: np.ndarray | None = None) -> IdentityPValues | None:
    """P-values of a per-identity score column among the control identities; None when the
    score was not computed or there are no controls. ``matched``: p-values already computed
    (:func:`count_matched_pvalues`), used instead of comparing with all controls alike."""
    if values is None or not is_control.any() or all(v is None for v in values):
        return None
    p, c = pvalues(float_vector(values), is_control)
    if matched is not None and c.size >= 2:
        p = matched
    hit = p <= target_fpr
    entry = threshold_entry(c, int((~np.isnan(p) & ~is_control).sum()), int((hit & ~is_control).sum()),
                            int((hit & is_control).sum()), target_fpr)
    if matched is not None and c.size >= 2:  # no one threshold: each count has its own controls
        entry.pop("threshold", None)
        entry["comparison"] = ("each identity against the controls' means over as many images as it has "
                               "(random subsets of the controls' images, seeded)")
    if c.size < 2:
        return IdentityPValues(entry)
    return IdentityPValues(entry, as_column(p), flag_column(p, target_fpr))


def write_sample_pvalues(layout: OutputLayout, image_scores: list[str], controls: Controls,
                         target_fpr: float, schema: pa.Schema, learned: LearnedScores | None = None,
                         fdr: float = 0.1, copies: Copies | None = None) -> dict[str, dict[str, Any]]:
    """Per-image p-values and flags among the control images (images listed as controls, or
    of a control identity), and Benjamini–Hochberg q-values and discoveries (q <= ``fdr``) over
    the candidate images: one ``sample_scores/`` part per ``samples/`` part. Three passes over
    the parts (control scores, then the candidates' p-values counted, then the parts written),
    reading only the needed columns, so memory stays per part. ``learned``: the learned attackers, whose scores
    are not columns of ``samples/``
    but computed per part; they are written as ``<name>_score`` with their p-values.
    Near-duplicate ``copies`` get a p-value but are neither controls nor candidates of the
    q-values (not separate evidence): their q-value and discovery are null. Returns the
    ``calibration.json`` entry per score."""
    import pyarrow as pa


    out_dir, store = layout.sample_scores_dir, layout.store
    parts = store.glob(layout.samples_dir)
    extra_names = sorted(learned.names) if learned is not None else []
    cols = ["position"] + [f"{a}_score" for a in image_scores] + (learned.columns if learned is not None else [])
    cache: dict[str, dict[str, np.ndarray]] = {}  # the learned scores of the part being read

    def read(part):
        t = ok_rows(part, cols, store)
        copy = Copies.of(copies, t)
        cache.clear()
        if learned is not None and extra_names:
            cache.update(learned.scores(part.name, t))
        return t, controls.mask(t) & ~copy, ~controls.mask(t) & ~copy

    def score(t, part, a) -> np.ndarray:
        if a in extra_names:
            return cache[a]
        return float_vector(t.column(f"{a}_score"))

    image_scores = list(image_scores) + extra_names
    control_scores: dict[str, list[np.ndarray]] = {a: [] for a in image_scores}
    computed: set[str] = set()
    for part in parts:
        t, is_control, _ = read(part)
        for a in image_scores:
            s = score(t, part, a)
            if not np.isnan(s).all():
                computed.add(a)
            s = s[is_control]
            control_scores[a].append(s[~np.isnan(s)])
    image_scores = [a for a in image_scores if a in computed]  # e.g. no calibrated caption without a reference
    sorted_controls = {a: np.sort(np.concatenate(v)) if v else np.array([]) for a, v in control_scores.items()}
    counters = {a: DiscoveryCounter() for a in image_scores}
    for part in parts:
        t, is_control, candidate = read(part)
        for a in image_scores:
            counters[a].add(pvalues_against(score(t, part, a), is_control, sorted_controls[a]), candidate)
    discoveries = {a: 0 for a in image_scores}
    written, control_identities = set(), set()
    flagged, control_flagged, scored = ({a: 0 for a in image_scores} for _ in range(3))
    for part in parts:
        t, is_control, candidate = read(part)
        columns: dict[str, Any] = {k: t.column(k) for k in ("shard", "key", "position", "identity")}
        columns["is_control"] = pa.array(is_control)
        for a in image_scores:
            s = score(t, part, a)
            if a in extra_names:
                columns[f"{a}_score"] = pa.array(s, mask=np.isnan(s))
            p = pvalues_against(s, is_control, sorted_controls[a])
            hit = p <= target_fpr
            q = counters[a].qvalues(p, candidate)
            columns[f"{a}_pvalue"] = pa.array(p, mask=np.isnan(p))
            columns[f"{a}_flag"] = pa.array(hit, mask=np.isnan(p))
            columns[f"{a}_qvalue"] = pa.array(q, mask=np.isnan(q))
            columns[f"{a}_discovery"] = pa.array(q <= fdr, mask=np.isnan(q))
            discoveries[a] += int(np.sum(q <= fdr))
            flagged[a] += int((hit & candidate).sum())
            control_flagged[a] += int((hit & is_control).sum())
            scored[a] += int((~np.isnan(p) & candidate).sum())
        control_identities.update(np.array(t.column("identity").to_pylist(), dtype=object)[is_control])
        arrays = [columns.get(f.name, pa.nulls(t.num_rows, f.type)) for f in schema]
        layout.write_table(out_dir / part.name, pa.Table.from_arrays(arrays, schema=schema))
        written.add(part.name)
    store.remove(*(p for p in store.glob(out_dir) if p.name not in written))
    return {a: {**threshold_entry(sorted_controls[a], scored[a], flagged[a], control_flagged[a], target_fpr,
                                  control_groups=len(control_identities)),
                **discovery_entry(discoveries[a], fdr)} for a in image_scores}


#: what calibration.json says about the method
METHOD = ("conformal: p = (1 + #{control scores >= s}) / (1 + n_controls); flag = p <= target_fpr, which for a "
          "non-control is score >= threshold. A new non-member drawn like the controls is flagged with probability "
          "<= target_fpr. A control is compared with the other controls only (leave-one-out); `flagged` counts "
          "non-controls, `controls_flagged_leave_one_out` the controls.")


def controls_in_words(c: dict[str, Any]) -> str:
    """calibration.json's ``controls`` in the words the log and the report share: the image
    controls counted are those the image p-values use (listed images and images of control
    identities)."""
    listed, used = c["images"], c.get("images_used")
    if used is None:  # calibration.json of an older version
        images = f"{listed} control images listed"
    elif used == listed:
        images = f"{used} control images (listed by shard,key)"
    elif listed == 0:
        images = f"{used} control images (the images of the control identities)"
    else:
        images = f"{used} control images ({listed} listed by shard,key, {used - listed} of control identities)"
    return f"{c['identities']} control identities and {images}"
