"""Calibration from known non-members ("controls"), with or without labels.

Controls are identities or images known NOT to be in the training data: the rows of a
``calibration.controls`` file, plus the non-members of the labels file when there is one.
Every score then gets an empirical (conformal) p-value among the controls' scores — a
control itself is compared with the *other* controls only — and a flag ``p <= target_fpr``,
which a new non-member drawn like the controls trips with probability at most
``target_fpr``. The equivalent score thresholds go to ``calibration.json``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .calibrate import conformal_threshold, pvalues_sorted
from .data.samples import normalize_name
from .evaluate import Labels, LabelsError, shard_file_name


@dataclass
class Controls:
    """Known non-members: identities, and images as (shard file name, key)."""

    identities: set[str] = field(default_factory=set)
    images: set[tuple[str, str]] = field(default_factory=set)
    sources: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.identities or self.images)


def read_controls(path: Path) -> Controls:
    """A CSV with ``identity`` and/or ``shard,key`` columns; a ``member`` column must say false."""
    out = Controls(sources=[str(path)])
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        if not ({"identity"} <= cols or {"shard", "key"} <= cols):
            raise LabelsError(f"calibration.controls: {path} needs a header with identity and/or shard,key")
        for line_no, row in enumerate(reader, start=2):
            member = (row.get("member") or "false").strip().lower()
            if member not in {"false", "0", "no", "n", "f", "nonmember", "non-member"}:
                raise LabelsError(f"calibration.controls: {path} line {line_no}: a control must be a non-member "
                                  f"(member={row.get('member')!r})")
            shard, key = (row.get("shard") or "").strip(), (row.get("key") or "").strip()
            ident = normalize_name(row.get("identity") or "")
            if shard and key:
                out.images.add((shard_file_name(shard), key))
            elif ident:
                out.identities.add(ident)
    return out


def control_set(path: Path | None, labels: Labels | None) -> Controls:
    """The controls file's rows plus the labelled non-members."""
    out = read_controls(path) if path is not None else Controls()
    if labels is not None:
        clash = sorted(n for n in out.identities if labels.identities.get(n))
        clash += sorted(f"{s}:{k}" for s, k in out.images if labels.images.get((s, k)))
        if clash:
            raise LabelsError(f"calibration.controls: {len(clash)} control(s) are labelled members in the labels "
                              f"file, e.g. {clash[0]!r}")
        out.identities |= {n for n, m in labels.identities.items() if not m}
        out.images |= {k for k, m in labels.images.items() if not m}
        out.sources.append("labels (non-members)")
    return out


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
