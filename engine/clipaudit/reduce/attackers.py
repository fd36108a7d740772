"""Learned attackers that score every candidate, saved so another audit can apply them.

For each attack with a feature vector and each of its learned variants, its attacker (a
logistic regression or a small MLP, as the variant declares) is fitted on the labelled images
— an image row of the labels file gives its own label, else the image inherits its identity's
label — with folds by identity; beyond :data:`MAX_FIT_IMAGES` on a seeded uniform sample of
them. Every ok sample then gets a score: out-of-fold for the images it was fitted on, from
the model fitted on them for the others. Without labels but with enough controls (known non-members), each
attacker is fitted weakly supervised, in the style of CLIP-MIA's weak supervision: the controls
are the non-members and the candidates whose score is above the controls' 90th percentile are
taken as pseudo-members (:func:`pseudo_labels`) — the score of *another* attack
(:func:`pseudo_source`: an independent signal's first), never the attacker's own, which it would
only learn back. The classes are balanced (:func:`balanced`) and the expected share of non-members among
the pseudo-members is recorded (:func:`expected_contamination`); the fit then runs as above.
The fitted models are written to ``attackers/<attack>_<variant>.json``
as plain arrays (nothing that can run code on load), so ``clipaudit reduce OUT --attackers
OTHER`` can score this audit with attackers fitted on another one — the shadow-model
workflow: fit where membership is known (a shadow model, a labelled calibration set), apply
where it is not.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipaudit.core.errors import ClipauditError
from clipaudit.contract.registry import Attack, Learned, registered
from clipaudit.contract.registry import scores as score_list
from clipaudit.reduce.learned import LogisticModel, MLPModel, crossfit_folds, crossfit_proba, fit_model
from clipaudit.reduce.neighbours import Copies
from clipaudit.io.outputs import OutputLayout
from clipaudit.io.store import Store
from clipaudit.reduce.evaluation import feature_matrix

if TYPE_CHECKING:
    from clipaudit.data.labels import Controls, Labels

log = logging.getLogger(__name__)

FORMAT = 1
FOLDS = 5
#: weak supervision: candidates above this quantile of the controls' scores are pseudo-members
PSEUDO_QUANTILE = 0.9
#: and it needs at least this many controls and pseudo-members, each from 2+ identities
MIN_WEAK = 5


class AttackerError(ClipauditError, ValueError):
    """Saved attackers that cannot be read or do not fit this audit's features."""


@dataclass
class Attacker:
    """One fitted attacker: which attack and variant, and the logistic model's arrays."""

    attack: str
    variant: str
    features_version: int
    model: LogisticModel | MLPModel
    fitted_on: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # the attack's map-side parameters its features came from

    @property
    def name(self) -> str:
        return f"{self.attack}_{self.variant}"

    def to_json(self) -> dict[str, Any]:
        m = self.model
        arrays = {"impute": m.impute.tolist(), "mean": m.mean.tolist(), "std": m.std.tolist()}
        if isinstance(m, MLPModel):
            model = {"kind": "mlp", **arrays, "weights": [w.tolist() for w in m.weights],
                     "biases": [b.tolist() for b in m.biases], "alpha": m.alpha}
        else:
            model = {"kind": "logistic", **arrays, "coef": m.coef.tolist(), "intercept": m.intercept, "l2": m.l2}
        model.update(n_iter=m.n_iter, converged=m.converged)
        return {"format": FORMAT, "attack": self.attack, "variant": self.variant,
                "features_version": self.features_version, "params": self.params, "fitted_on": self.fitted_on,
                "model": model}

    @classmethod
    def from_json(cls, doc: dict[str, Any], source: str) -> Attacker:
        if doc.get("format") != FORMAT:
            raise AttackerError(f"{source}: attacker format {doc.get('format')!r}, this clipaudit reads {FORMAT}")
        m = doc["model"]
        arr = {k: np.asarray(m[k], dtype=np.float64) for k in ("impute", "mean", "std")}
        if m.get("kind", "logistic") == "mlp":
            model: LogisticModel | MLPModel = MLPModel(
                **arr, weights=tuple(np.asarray(w, dtype=np.float64) for w in m["weights"]),
                biases=tuple(np.asarray(b, dtype=np.float64) for b in m["biases"]), alpha=float(m["alpha"]),
                n_iter=int(m["n_iter"]), converged=bool(m["converged"]))
        else:
            model = LogisticModel(**arr, coef=np.asarray(m["coef"], dtype=np.float64), intercept=float(m["intercept"]),
                                  l2=float(m["l2"]), n_iter=int(m["n_iter"]), converged=bool(m["converged"]))
        return cls(doc["attack"], doc["variant"], int(doc["features_version"]), model, doc.get("fitted_on", {}),
                   doc.get("params", {}))


def variants(enabled: tuple[str, ...]) -> list[tuple[Attack, Learned]]:
    """(attack, learned variant) pairs of the enabled attacks that have a feature vector."""
    return [(a, v) for a in registered() if a.name in enabled and a.features for v in a.learned]


def image_labels(identities: list[str | None], shards: list[str], keys: list[str | None],
                 labels: Labels | None) -> np.ndarray:
    """Per image: 1 member, 0 non-member, -1 unlabelled (image rows first, then the identity's)."""
    out = np.full(len(keys), -1, dtype=np.int8)
    if labels is None:
        return out
    for i, (ident, shard, key) in enumerate(zip(identities, shards, keys)):
        m = labels.images.get((shard, key))
        if m is None:
            m = labels.identities.get(ident) if ident is not None else None
        if m is not None:
            out[i] = int(m)
    return out


def pseudo_labels(score: np.ndarray, is_control: np.ndarray, groups: np.ndarray,
                  quantile: float = PSEUDO_QUANTILE, minimum: int = MIN_WEAK) -> np.ndarray | None:
    """Weak labels from controls alone: 0 for the controls, 1 for the other candidates whose
    score is above the controls' ``quantile``, -1 for the rest; None when either side has
    fewer than ``minimum`` images or comes from a single identity (nothing to fit on)."""
    controls = is_control & np.isfinite(score)
    if controls.sum() < minimum:
        return None
    y = weak_labels(score, is_control, float(np.quantile(score[controls], quantile)))
    return None if _too_weak(y, groups, minimum) else y


def weak_labels(score: np.ndarray, is_control: np.ndarray, cut: float) -> np.ndarray:
    """0 for the controls with a score, 1 for the other candidates scoring above ``cut``, else -1."""
    finite = np.isfinite(score)
    y = np.full(len(score), -1, dtype=np.int8)
    y[is_control & finite] = 0
    y[~is_control & finite & (score > cut)] = 1
    return y


def _too_weak(y: np.ndarray, groups: np.ndarray, minimum: int = MIN_WEAK) -> bool:
    """Whether weak labels leave too little to fit on: fewer than ``minimum`` of either side,
    or either side from a single identity."""
    ctl, pseudo = y == 0, y == 1
    return bool(ctl.sum() < minimum or pseudo.sum() < minimum or len(np.unique(groups[pseudo])) < 2
                or len(np.unique(groups[ctl])) < 2)


def fit_and_score(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0, kind: str = "logistic"
                  ) -> tuple[np.ndarray, LogisticModel | MLPModel] | None:
    """Scores for every row (out-of-fold where labelled) and the model fitted on all labelled
    rows; None when the labelled rows cannot be cross-fitted (one class, fewer than 2 groups)."""
    have = (y >= 0) & ~np.all(np.isnan(X), axis=1)
    yl = y[have].astype(bool)
    if have.sum() < 4 or yl.all() or not yl.any() or len(np.unique(groups[have])) < 2:
        return None
    scores = np.full(len(y), np.nan)
    folds = crossfit_folds(yl, groups[have], folds=FOLDS, seed=seed)
    Xl = X[have]
    scores[have] = crossfit_proba(Xl, yl, fold_ids=folds, seed=seed, kind=kind)
    model = fit_model(kind, Xl, yl, seed=seed)
    rest = ~have & ~np.all(np.isnan(X), axis=1)
    if rest.any():
        scores[rest] = model.predict_proba(X[rest])
    return scores, model


def save(attackers: list[Attacker], layout: OutputLayout) -> None:
    """Write the attackers under the output's ``attackers/`` (and remove the stale ones there)."""
    folder = layout.attackers_dir
    keep = {f"{a.name}.json" for a in attackers}
    for a in attackers:
        layout.write_json(folder / f"{a.name}.json", a.to_json())
    layout.store.remove(*(p for p in layout.store.glob(folder, ".json") if p.name not in keep))


def load(folder: Path) -> list[Attacker]:
    """The attackers saved under an audit's ``attackers/`` (JSON only; nothing is executed)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} holds no fitted attackers (run a labelled audit there first)")
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            out.append(Attacker.from_json(json.loads(path.read_text()), str(path)))
        except AttackerError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise AttackerError(f"attackers: {path} is not a clipaudit attacker: {e}") from None
    if not out:
        raise FileNotFoundError(f"{folder} holds no fitted attackers")
    return out


#: the fit set is a seeded sample of at most this many images per attack (the rest are scored
#: by the model fitted on it), so fitting neither grows nor slows with the audit
MAX_FIT_IMAGES = 20_000


@dataclass
class _Fitted:
    """One learned variant ready to score parts: its model, and the out-of-fold scores of the
    images it was fitted on, per part file name (ok-row indices, scores)."""

    attack: Attack
    variant: Learned
    model: LogisticModel | MLPModel
    oof: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass
class LearnedScores:
    """The learned attackers' scores of any ``samples/`` part, computed when a part is read
    (:meth:`scores`); and the attackers that were fitted here (to be saved)."""

    fitted: list[Attacker] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    variants: dict[str, _Fitted] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        """The ``samples`` columns :meth:`scores` needs."""
        return sorted({f.attack.features for f in self.variants.values()})

    def scores(self, part: str, ok_rows) -> dict[str, np.ndarray]:
        """Per score name (``<attack>_<variant>``): the scores of a part's ok rows (an Arrow
        table with :attr:`columns`), in row order — out-of-fold for the images fitted on."""
        out = {}
        for name, f in self.variants.items():
            X = f.variant.prepare(feature_matrix(ok_rows.column(f.attack.features)))
            missing = np.all(np.isnan(X), axis=1)
            s = np.full(len(X), np.nan)
            if (~missing).any():
                s[~missing] = f.model.predict_proba(X[~missing])
            if part in f.oof:
                rows, oof = f.oof[part]
                s[rows] = oof
            out[name] = s
        return out


@dataclass
class _FitSet:
    """One attack's fit set, gathered part by part: a uniform seeded sample (smallest draw
    ``u``) of at most ``cap`` of the images with a target (label or weak label)."""

    cap: int
    pool: int = 0  # images with a target seen, sampled or not
    u: list[np.ndarray] = field(default_factory=list)
    part: list[np.ndarray] = field(default_factory=list)
    row: list[np.ndarray] = field(default_factory=list)
    group: list[np.ndarray] = field(default_factory=list)
    y: list[np.ndarray] = field(default_factory=list)
    X: list[np.ndarray] = field(default_factory=list)

    def add(self, keep: np.ndarray, u: np.ndarray, part: int, groups: np.ndarray, y: np.ndarray,
            X: np.ndarray) -> None:
        idx = np.flatnonzero(keep)
        self.pool += len(idx)
        for lst, v in ((self.u, u[idx]), (self.part, np.full(len(idx), part)), (self.row, idx),
                       (self.group, groups[idx]), (self.y, y[idx]), (self.X, X[idx])):
            lst.append(v)
        if sum(len(x) for x in self.u) > 2 * self.cap:  # prune now and then: memory stays ~ 2 caps
            self._prune()

    def _prune(self) -> None:
        u = np.concatenate(self.u)
        pick = np.sort(np.argpartition(u, self.cap)[: self.cap]) if len(u) > self.cap else np.arange(len(u))
        for name in ("u", "part", "row", "group", "y", "X"):
            setattr(self, name, [np.concatenate(getattr(self, name))[pick]])

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(part, row, group, y, X) of the sample, in part and row order."""
        if not self.u:
            return (np.empty(0, dtype=np.int64),) * 4 + (np.empty((0, 0)),)
        self._prune()
        part, row, group, y, X = (np.concatenate(getattr(self, n)) for n in ("part", "row", "group", "y", "X"))
        order = np.lexsort((row, part))
        return part[order], row[order], group[order], y[order], X[order]


def ok_rows(part: Path, columns: list[str], store: Store):
    """A ``samples/`` part's ok rows: ``shard``, ``key``, ``position``, ``identity``, ``status`` and
    ``columns``; read through the output's ``store``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with store.open(part) as f:
        t = pq.read_table(f, columns=list(dict.fromkeys(["shard", "key", "position", "identity", "status", *columns])))
    return t.filter(pc.equal(t["status"], "ok"))


def pseudo_source(attack: str, signals: list[str]) -> str | None:
    """The score that picks an attack's pseudo-members: never the attack's own (its attacker
    would learn back the rule that made its labels, a circle), first one whose attack declares
    an ``independent_signal`` (the image–caption cosine, CLIP-MIA's signal, shares no input with
    the view-consistency features), else the first other one."""
    others = [s for s in signals if s != attack]
    owner = {score.name: a for a in registered() for score in a.scores}
    independent = [s for s in others if s in owner and owner[s].independent_signal]
    return (independent or others or [None])[0]


def _weak_cuts(parts: list[Path], own: dict[str, str], controls: Controls,
               store: Store, quantile: float = PSEUDO_QUANTILE, copies: Copies | None = None
               ) -> tuple[dict[str, float | None], dict[str, int]]:
    """Per signal (name → score column): its ``quantile`` among the control images (None with
    fewer than :data:`MIN_WEAK` controls), and how many candidate images have it — the first
    pass of weak supervision."""
    found: dict[str, list[np.ndarray]] = {a: [] for a in own}
    n_candidates = {a: 0 for a in own}
    for part in parts:
        t = ok_rows(part, sorted(set(own.values())), store)
        copy = Copies.of(copies, t)
        is_control = controls.mask(t) & ~copy
        for a, col in own.items():
            s = t.column(col).to_numpy(zero_copy_only=False).astype(float)
            found[a].append(s[is_control & np.isfinite(s)])
            n_candidates[a] += int((~is_control & ~copy & np.isfinite(s)).sum())
    cuts: dict[str, float | None] = {}
    for a, chunks in found.items():
        s = np.concatenate(chunks) if chunks else np.empty(0)
        cuts[a] = float(np.quantile(s, quantile)) if len(s) >= MIN_WEAK else None
    return cuts, n_candidates


def balanced(y: np.ndarray, seed: int) -> np.ndarray:
    """``y`` with the larger class cut (seeded) to the smaller's size: dropped rows become -1
    (scored, not fitted on), so an attacker does not learn the pseudo-labels' class ratio."""
    y = y.copy()
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    big = pos if len(pos) > len(neg) else neg
    drop = len(big) - min(len(pos), len(neg))
    if drop > 0:
        y[np.random.default_rng([seed, 0xBA1]).choice(big, drop, replace=False)] = -1
    return y


def expected_contamination(n_pseudo: int, n_candidates: int, quantile: float = PSEUDO_QUANTILE) -> float:
    """An upper bound on the expected share of non-members among the pseudo-members: a
    non-member drawn like the controls lands above their ``quantile`` with probability at most
    1 − quantile, and at most all ``n_candidates`` are non-members."""
    return float(min(1.0, (1 - quantile) * n_candidates / max(n_pseudo, 1)))


def score_candidates(layout, params: dict[str, Any], labels: Labels | None,
                     apply: list[Attacker] | None = None, seed: int = 0,
                     controls: Controls | None = None, max_fit: int = MAX_FIT_IMAGES,
                     copies: Copies | None = None) -> LearnedScores:
    """Attackers for every learned variant that score any part (:meth:`LearnedScores.scores`):
    fitted here on ``labels`` (out-of-fold where fitted), weakly supervised on ``controls``
    when there are no labels, or the ``apply`` attackers fitted on another audit. Near-duplicate
    ``copies`` are scored but never fitted on (nor taken as controls for weak supervision).

    Streams the parts: memory holds one part and each attack's fit set, a seeded sample of at
    most ``max_fit`` images with a target (``fitted_on.pool`` counts them all), not the audit.
    With weak supervision a first pass finds each attack's cut among the controls."""
    pairs = variants(tuple(params))
    out = LearnedScores()
    weak = labels is None and apply is None and bool(controls)
    if not pairs or (labels is None and not apply and not weak):
        return out
    store = layout.store
    parts = store.glob(layout.samples_dir)
    if apply is not None:
        return _applied(parts, pairs, params, apply, store)
    attacks = {a.name: a for a, _ in pairs}
    own: dict[str, str] = {}  # attack → the score column that picks its pseudo-members (weak supervision)
    cuts: dict[str, float | None] = {}
    candidates: dict[str, int] = {}
    if weak:
        signals = {s.name: f"{s.name}_score" for s in score_list(tuple(params), "image")}
        signal_cuts, signal_candidates = _weak_cuts(parts, signals, controls, store, copies=copies)  # type: ignore[arg-type]
        for name in attacks:
            source = pseudo_source(name, [s for s, c in signal_cuts.items() if c is not None])
            if source is None:
                log.warning("attackers: %s not fitted without labels: its pseudo-members would have to come from "
                            "its own score, which its attacker would only learn back (needs another image-level "
                            "attack, best one whose score is an independent signal)", name)
                continue
            own[name], cuts[name], candidates[name] = signals[source], signal_cuts[source], signal_candidates[source]
    columns = sorted({a.features for a in attacks.values()} | set(own.values()))
    sets = {name: _FitSet(max_fit) for name in attacks}
    group_ids: dict[str, int] = {}

    for p, part in enumerate(parts):
        t = ok_rows(part, columns, store)
        if not t.num_rows:
            continue
        identities = t.column("identity").to_pylist()
        groups = np.array([group_ids.setdefault(i or "", len(group_ids)) for i in identities], dtype=np.int64)
        u = np.random.default_rng([seed, p, 0x5EED]).random(t.num_rows)
        y_labels = image_labels(identities, t.column("shard").to_pylist(), t.column("key").to_pylist(), labels) \
            if not weak else None
        copy = Copies.of(copies, t)
        is_control = controls.mask(t) & ~copy if weak else None  # type: ignore[union-attr]
        for name, attack in attacks.items():
            if weak:
                cut = cuts.get(name)
                if cut is None:
                    continue
                y = weak_labels(t.column(own[name]).to_numpy(zero_copy_only=False).astype(float), is_control, cut)
            else:
                y = y_labels
            X = feature_matrix(t.column(attack.features))
            sets[name].add((y >= 0) & ~np.all(np.isnan(X), axis=1) & ~copy, u, p, groups, y, X)
    for attack, variant in pairs:
        name = f"{attack.name}_{variant.name}"
        if weak and attack.name not in own:
            continue
        part, row, groups, y, X = sets[attack.name].arrays()
        if weak and _too_weak(y, groups):
            log.warning("attackers: %s not fitted: too few controls or candidates above them for weak "
                        "supervision (needs %d of each, from 2+ identities)", name, MIN_WEAK)
            continue
        weak_info: dict[str, Any] = {}
        if weak:
            n_pseudo = int((y == 1).sum())
            weak_info = {"weak": 1, "pseudo_members_from": own[attack.name].removesuffix("_score"),
                         "pseudo_members": n_pseudo, "controls": int((y == 0).sum()),
                         "expected_contamination": round(expected_contamination(n_pseudo, candidates[attack.name]), 4)}
            y = balanced(y, seed)
        fitted = fit_and_score(variant.prepare(X), y, groups, seed, variant.model) if len(y) else None
        if fitted is None:
            continue
        scores, model = fitted
        pool = sets[attack.name].pool
        out.fitted.append(Attacker(attack.name, variant.name, attack.features_version, model, {
            "images": int((y >= 0).sum()), "members": int((y == 1).sum()), "nonmembers": int((y == 0).sum()),
            "identities": int(len(np.unique(groups))), **({"pool": pool} if pool > len(y) else {}),
            **weak_info}, attack.map_fingerprint(params[attack.name])))
        if pool > len(y):
            log.info("attackers: %s fitted on a seeded sample of %d of %d images", name, len(y), pool)
        f = _Fitted(attack, variant, model)
        for p in np.unique(part):
            here = part == p
            f.oof[parts[int(p)].name] = (row[here], scores[here])
        out.variants[name] = f
        out.names.append(name)
    return out


def _applied(parts: list[Path], pairs: list[tuple[Attack, Learned]], params: dict[str, Any],
             apply: list[Attacker], store: Store) -> LearnedScores:
    """Attackers fitted on another audit, checked against this audit's features (the first
    part that has them) before anything is scored."""
    out = LearnedScores()
    given = {a.name: a for a in apply}
    for attack, variant in pairs:
        name = f"{attack.name}_{variant.name}"
        if name not in given:
            continue
        att = given[name]
        width = None
        for part in parts:
            t = ok_rows(part, [attack.features], store)
            X = variant.prepare(feature_matrix(t.column(attack.features)))
            if t.num_rows and not np.all(np.isnan(X)):
                width = X.shape[1]
                break
        here = attack.map_fingerprint(params[attack.name])
        if att.features_version != attack.features_version or (width is not None and att.model.n_features != width) \
                or att.params != here:
            raise AttackerError(f"attackers: {name} was fitted on other features (version {att.features_version}, "
                                f"{att.model.n_features} values, parameters {att.params}) than this audit has "
                                f"(version {attack.features_version}, {width} values, parameters {here})")
        out.variants[name] = _Fitted(attack, variant, att.model)
        out.names.append(name)
    return out
