"""Scoring attacks against ground truth: labels, per-attack metrics, ROC tables and the
distribution-shift validity check.

Levels: IDIA is scored per identity. Image-side attacks are scored per image where the
labels file has image rows (``shard,key,member``), else per identity (mean image score).
Fixed scores (a mean cosine) need no fitting. Learned variants (a logistic attacker on
an attack's raw feature vector) and the model-free baseline are cross-fitted: every
prediction comes from a model fitted on other folds, and all images of one identity stay
in the same fold.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .calibrate import crossfit_proba
from .data.samples import normalize_name
from .metrics import membership_metrics, roc_curve

_TRUE = {"true", "1", "yes", "y", "t", "member"}
_FALSE = {"false", "0", "no", "n", "f", "nonmember", "non-member"}

#: an attack whose AUC the model-free baseline comes within this margin of is suspect
SHIFT_MARGIN = 0.05
#: ... provided the baseline itself separates the sets at least this well
SHIFT_FLOOR = 0.6


class LabelsError(ValueError):
    """The labels file cannot be read; the message names the line."""


def shard_file_name(shard: str) -> str:
    """The last path component of a shard path or URL (how labels and controls name shards)."""
    return re.split(r"[/\\]", shard)[-1]


@dataclass
class Labels:
    identities: dict[str, bool] = field(default_factory=dict)
    images: dict[tuple[str, str], bool] = field(default_factory=dict)  # (shard file name, key)


def _parse_member(value: str | None, path: Path, line_no: int) -> bool:
    v = (value or "").strip().lower()
    if v not in _TRUE | _FALSE:
        raise LabelsError(f"labels: {path} line {line_no}: member must be true/false, got {value!r}")
    return v in _TRUE


def read_labels(path: Path) -> Labels:
    """Identity rows (``identity,member``) and/or image rows (``shard,key,member``).

    Image rows match samples by the shard's file name and the key.
    """
    out = Labels()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        if "member" not in cols or not ({"identity"} <= cols or {"shard", "key"} <= cols):
            raise LabelsError(f"labels: {path} needs a header with identity,member and/or shard,key,member")
        for line_no, row in enumerate(reader, start=2):
            shard, key = (row.get("shard") or "").strip(), (row.get("key") or "").strip()
            ident = normalize_name(row.get("identity") or "")
            if not (shard and key) and not ident:
                continue
            member = _parse_member(row.get("member"), path, line_no)
            if shard and key:
                out.images[(shard_file_name(shard), key)] = member
            else:
                out.identities[ident] = member
    return out


@dataclass
class Scored:
    """One evaluation table: a score per unit, its label, its group, optional features."""

    level: str
    labels: np.ndarray
    groups: np.ndarray
    scores: dict[str, np.ndarray]  # attack → fixed score (nan = missing)
    features: dict[str, np.ndarray]  # attack/"baseline" → feature matrix (rows may hold nan)


def _evaluate_fixed(name: str, score: np.ndarray, y: np.ndarray, level: str, roc_rows: list) -> dict | None:
    keep = ~np.isnan(score)
    if keep.sum() < 2 or y[keep].all() or not y[keep].any():
        return None
    m = membership_metrics(score[keep], y[keep])
    _roc_rows(roc_rows, name, level, "threshold", score[keep], y[keep])
    return {"level": level, "variant": "threshold", **m}


def set_pooling(X: np.ndarray, bins: int = 10) -> np.ndarray:
    """Order-invariant summary of each row's values (EncoderMI's set variant): a normalised
    histogram over [0, 1] plus mean and standard deviation. Rows with nan stay nan."""
    bad = np.isnan(X).any(axis=1)
    Z = np.nan_to_num(np.clip(X, 0.0, 1.0))
    edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    which = np.searchsorted(edges, Z, side="right")
    hist = np.stack([(which == b).mean(axis=1) for b in range(bins)], axis=1)
    out = np.column_stack([hist, np.nanmean(np.where(bad[:, None], 0, X), axis=1), np.std(Z, axis=1)])
    out[bad] = np.nan
    return out


_LEARNED = {
    "learned": (lambda X: X, "learned (cross-fitted logistic on the feature vector, 5 folds by identity)"),
    "learned_set": (set_pooling, "learned set (cross-fitted logistic on a histogram + mean + std of the "
                                 "feature values, order-invariant, 5 folds by identity)"),
}


def _evaluate_learned(name: str, X: np.ndarray, y: np.ndarray, groups: np.ndarray, level: str,
                      roc_rows: list, variant: str = "learned") -> dict | None:
    transform, what = _LEARNED[variant]
    X = transform(X)
    keep = ~np.all(np.isnan(X), axis=1)
    if keep.sum() < 4 or y[keep].all() or not y[keep].any() or len(np.unique(groups[keep])) < 2:
        return None
    p = crossfit_proba(X[keep], y[keep], groups=groups[keep], folds=5, seed=0)
    _roc_rows(roc_rows, name, level, variant, p, y[keep])
    return {"level": level, "variant": what, **membership_metrics(p, y[keep])}


def _roc_rows(out: list, attack: str, level: str, variant: str, s: np.ndarray, y: np.ndarray) -> None:
    roc = roc_curve(s, y)
    for f, t, th in zip(roc.fpr, roc.tpr, roc.thresholds):
        out.append({"attack": attack, "level": level, "variant": variant, "fpr": float(f), "tpr": float(t),
                    "threshold": float(th)})


def evaluate(tables: list[Scored], feature_attacks: set[str],
             set_attacks: frozenset[str] = frozenset({"encodermi"})) -> tuple[dict[str, Any], list[dict]]:
    """metrics.json content and ROC rows for every attack at its level, plus the baseline."""
    metrics: dict[str, Any] = {}
    roc_rows: list[dict] = []
    baselines = []
    for t in tables:
        for name, score in t.scores.items():
            fixed = _evaluate_fixed(name, score, t.labels, t.level, roc_rows)
            if fixed is None:
                continue
            if name in feature_attacks and name in t.features:
                for variant in ("learned", "learned_set") if name in set_attacks else ("learned",):
                    learned = _evaluate_learned(name, t.features[name], t.labels, t.groups, t.level, roc_rows,
                                                variant)
                    if learned is not None:
                        fixed[variant] = learned
            metrics[name] = fixed
        if "baseline" in t.features and any(m.get("level") == t.level for m in metrics.values()):
            b = _evaluate_learned("baseline", t.features["baseline"], t.labels, t.groups, t.level, roc_rows)
            if b is not None:
                best = max(_best_auc(m) for m in metrics.values() if m.get("level") == t.level)
                b["what"] = "model-free image statistics (colour, saturation, brightness, edges, size), " \
                            "cross-fitted logistic regression"
                b["best_attack_auc"] = best
                b["warning"] = bool(b["auc"] >= SHIFT_FLOOR and b["auc"] >= best - SHIFT_MARGIN)
                baselines.append(b)
    if baselines:
        metrics["baseline"] = baselines[0] if len(baselines) == 1 else {"by_level": baselines,
                                                                        "auc": max(b["auc"] for b in baselines)}
    metrics["distribution_shift_warning"] = any(b["warning"] for b in baselines)
    metrics["shift_rule"] = (f"warning when the baseline AUC >= {SHIFT_FLOOR} and within {SHIFT_MARGIN} "
                             "of the best attack AUC at the same level")
    return metrics, roc_rows


def _best_auc(m: dict) -> float:
    vals = [m.get("auc", float("nan"))] + [m.get(v, {}).get("auc", float("nan")) for v in _LEARNED]
    vals = [v for v in vals if v == v]
    return max(vals) if vals else 0.0
