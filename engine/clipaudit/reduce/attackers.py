"""Learned attackers that score every candidate, saved so another audit can apply them.

For each attack with a feature vector and each of its learned variants, its attacker (a
logistic regression or a small MLP, as the variant declares) is fitted on the labelled images — an image row of the labels file gives its own label, else
the image inherits its identity's label — with folds by identity. Every ok sample then gets
a score: out-of-fold for the images it was fitted on, from the model fitted on all labelled
images for the others. Without labels but with enough controls (known non-members), each
attacker is fitted weakly supervised, in the style of CLIP-MIA's weak supervision: the controls
are the non-members and the candidates whose own attack score is above the controls' 90th
percentile are taken as pseudo-members (:func:`pseudo_labels`); the fit then runs as above.
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

from ..attacks.registry import Attack, Learned, registered
from .learned import LogisticModel, MLPModel, crossfit_folds, fit_model

if TYPE_CHECKING:
    from .labels import Controls, Labels

log = logging.getLogger(__name__)

FORMAT = 1
FOLDS = 5
#: weak supervision: candidates above this quantile of the controls' scores are pseudo-members
PSEUDO_QUANTILE = 0.9
#: and it needs at least this many controls and pseudo-members, each from 2+ identities
MIN_WEAK = 5


class AttackerError(ValueError):
    """Saved attackers that cannot be read or do not fit this audit's features."""


@dataclass
class Attacker:
    """One fitted attacker: which attack and variant, and the logistic model's arrays."""

    attack: str
    variant: str
    features_version: int
    model: LogisticModel | MLPModel
    fitted_on: dict[str, int] = field(default_factory=dict)
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
    def from_json(cls, doc: dict[str, Any], source: str) -> "Attacker":
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
                 labels: "Labels | None") -> np.ndarray:
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
    finite = np.isfinite(score)
    controls = is_control & finite
    if controls.sum() < minimum:
        return None
    cut = np.quantile(score[controls], quantile)
    pseudo = ~is_control & finite & (score > cut)
    if pseudo.sum() < minimum or len(np.unique(groups[pseudo])) < 2 or len(np.unique(groups[controls])) < 2:
        return None
    y = np.full(len(score), -1, dtype=np.int8)
    y[controls] = 0
    y[pseudo] = 1
    return y


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
    oof = np.full(len(yl), np.nan)
    for f in np.unique(folds):
        test = folds == f
        train_y = yl[~test]
        if train_y.all() or not train_y.any():
            oof[test] = float(train_y.mean())
        else:
            oof[test] = fit_model(kind, Xl[~test], train_y, seed=seed).predict_proba(Xl[test])
    scores[have] = oof
    model = fit_model(kind, Xl, yl, seed=seed)
    rest = ~have & ~np.all(np.isnan(X), axis=1)
    if rest.any():
        scores[rest] = model.predict_proba(X[rest])
    return scores, model


def save(attackers: list[Attacker], folder: Path) -> None:
    from ..io.outputs import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    keep = {f"{a.name}.json" for a in attackers}
    for a in attackers:
        atomic_write_json(folder / f"{a.name}.json", a.to_json())
    for stale in folder.glob("*.json"):
        if stale.name not in keep:
            stale.unlink()


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


@dataclass
class LearnedScores:
    """Per ``samples/`` part file name and score name (``<attack>_<variant>``): the scores of
    its ok rows in file order; and the attackers that were fitted here (to be saved)."""

    by_part: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    fitted: list[Attacker] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def score_candidates(layout, params: dict[str, Any], labels: "Labels | None",
                     apply: list[Attacker] | None = None, seed: int = 0,
                     controls: "Controls | None" = None) -> LearnedScores:
    """Score every ok sample with every learned variant: fitted here on ``labels`` (out-of-fold
    where labelled), weakly supervised on ``controls`` when there are no labels, or the
    ``apply`` attackers fitted on another audit. Reads the ok rows'
    feature vectors of all parts (memory grows with the audit: a 10^7-image audit needs the
    features of all its images at once)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .evaluation import feature_matrix

    pairs = variants(tuple(params))
    out = LearnedScores()
    weak = labels is None and apply is None and bool(controls)
    if not pairs or (labels is None and not apply and not weak):
        return out
    parts = sorted(layout.samples_dir.glob("*.parquet"))
    feature_cols = sorted({a.features for a, _ in pairs})
    if weak:  # the attacks' own image scores pick the pseudo-members
        feature_cols += sorted({f"{s.name}_score" for a, _ in pairs for s in a.image_scores()[:1]} - set(feature_cols))
    tables, sizes = [], []
    for part in parts:
        t = pq.read_table(part, columns=["shard", "key", "identity", "status", *feature_cols])
        t = t.filter(pc.equal(t["status"], "ok"))
        tables.append(t)
        sizes.append(t.num_rows)
    if not sum(sizes):
        return out
    table = pa.concat_tables(tables)
    identities = table.column("identity").to_pylist()
    groups = np.unique(np.array([i or "" for i in identities], dtype=object), return_inverse=True)[1]
    shards, keys = table.column("shard").to_pylist(), table.column("key").to_pylist()
    y = image_labels(identities, shards, keys, labels)
    if weak:
        assert controls is not None
        is_control = np.array([controls.is_control(i, s, k) for i, s, k in zip(identities, shards, keys)])
    given = {a.name: a for a in apply or []}
    bounds = np.cumsum([0, *sizes])
    for attack, variant in pairs:
        name = f"{attack.name}_{variant.name}"
        X = variant.prepare(feature_matrix(table.column(attack.features)))
        missing = np.all(np.isnan(X), axis=1)
        if apply is not None:
            if name not in given:
                continue
            att = given[name]
            here = attack.map_fingerprint(params[attack.name])
            if att.features_version != attack.features_version or att.model.n_features != X.shape[1] \
                    or att.params != here:
                raise AttackerError(f"attackers: {name} was fitted on other features (version {att.features_version}, "
                                    f"{att.model.n_features} values, parameters {att.params}) than this audit has "
                                    f"(version {attack.features_version}, {X.shape[1]} values, parameters {here})")
            scores = np.full(len(X), np.nan)
            scores[~missing] = att.model.predict_proba(X[~missing])
        else:
            target = y
            if weak:
                own = attack.image_scores()
                target = pseudo_labels(table.column(f"{own[0].name}_score").to_numpy(zero_copy_only=False).astype(float),
                                       is_control, groups) if own else None
                if target is None:
                    log.warning("attackers: %s not fitted: too few controls or candidates above them for weak "
                                "supervision (needs %d of each, from 2+ identities)", name, MIN_WEAK)
                    continue
            fitted = fit_and_score(X, target, groups, seed, variant.model)
            if fitted is None:
                continue
            scores, model = fitted
            lab = target >= 0
            out.fitted.append(Attacker(attack.name, variant.name, attack.features_version, model, {
                "images": int(lab.sum()), "members": int((target == 1).sum()),
                "nonmembers": int((target == 0).sum()), "identities": int(len(np.unique(groups[lab]))),
                **({"weak": 1} if weak else {})}, attack.map_fingerprint(params[attack.name])))
        out.names.append(name)
        for part, lo, hi in zip(parts, bounds[:-1], bounds[1:]):
            out.by_part.setdefault(part.name, {})[name] = scores[lo:hi]
    return out
