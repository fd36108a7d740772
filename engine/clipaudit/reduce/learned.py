"""Learned attackers: L2 logistic regression and cross-fitting by group.

Conventions follow :mod:`clipaudit.reduce.statistics`: a higher score means "more
member-like" and members (label 1) are positives. Anything fitted on labelled rows is
evaluated only on held-out rows (cross-fitting), and all rows of one group (e.g. images of
one person) always land in the same fold, so no group is ever split between fitting and
evaluation.

numpy only; every function is deterministic given its inputs (and ``seed``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "LogisticModel",
    "standardize_fit",
    "fit_logistic",
    "crossfit_folds",
    "crossfit_proba",
]

STD_FLOOR = 1e-8


# --------------------------------------------------------------------------- helpers


def _as_2d(X: np.ndarray) -> np.ndarray:
    """Float64 copy of X as (n_rows, n_features); a 1-D array is one feature column."""
    X = np.array(X, dtype=np.float64)
    if X.ndim == 1:
        X = X.reshape(-1, 1)
    if X.ndim != 2:
        raise ValueError(f"X must be 1-D or 2-D, got shape {X.shape}")
    return X


def _as_labels(y: np.ndarray, n: int | None = None) -> np.ndarray:
    """Validate binary labels (bool or 0/1) and return them as float64 0/1."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {y.shape}")
    if n is not None and len(y) != n:
        raise ValueError(f"y has {len(y)} rows, X has {n}")
    yf = y.astype(np.float64)
    if not np.all((yf == 0.0) | (yf == 1.0)):
        raise ValueError("y must be binary (0/1 or bool)")
    return yf


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _group_codes(groups: np.ndarray | None, n: int) -> np.ndarray:
    """Integer code per row (first-occurrence order); None means one group per row."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups)
    if g.ndim != 1 or len(g) != n:
        raise ValueError(f"groups must be 1-D with {n} entries, got shape {g.shape}")
    codes: dict = {}
    return np.array([codes.setdefault(v, len(codes)) for v in g.tolist()], dtype=np.int64)


# --------------------------------------------------------------------------- standardisation


def standardize_fit(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column (mean, std) ignoring NaNs; std floored at 1e-8, all-NaN columns -> (0, 1)."""
    X = _as_2d(X)
    finite = ~np.isnan(X)
    count = finite.sum(axis=0)
    safe = np.where(finite, X, 0.0)
    mean = np.divide(safe.sum(axis=0), count, out=np.zeros(X.shape[1]), where=count > 0)
    var = np.divide(
        (np.where(finite, X - mean, 0.0) ** 2).sum(axis=0),
        count,
        out=np.ones(X.shape[1]),
        where=count > 0,
    )
    return mean, np.maximum(np.sqrt(var), STD_FLOOR)


# --------------------------------------------------------------------------- logistic regression


@dataclass(frozen=True)
class LogisticModel:
    """Fitted L2 logistic regression; weights live in the standardised feature space.

    ``impute`` holds the training column means used to fill NaNs (equal to ``mean``).
    """

    impute: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: float
    l2: float
    n_iter: int
    converged: bool

    @property
    def n_features(self) -> int:
        """Number of input feature columns."""
        return int(self.coef.shape[0])

    @property
    def coef_raw(self) -> np.ndarray:
        """Weights on the raw (unstandardised, imputed) features."""
        return self.coef / self.std

    @property
    def intercept_raw(self) -> float:
        """Intercept on the raw (unstandardised, imputed) features."""
        return float(self.intercept - np.dot(self.coef, self.mean / self.std))

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Impute NaNs with the training means, then standardise."""
        X = _as_2d(X)
        if X.shape[1] != self.n_features:
            raise ValueError(f"X has {X.shape[1]} features, model was fitted on {self.n_features}")
        X = np.where(np.isnan(X), self.impute, X)
        return (X - self.mean) / self.std

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Log-odds of membership per row."""
        return self.transform(X) @ self.coef + self.intercept

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Member probability per row (1-D array)."""
        return _sigmoid(self.decision_function(X))


def _objective(Z: np.ndarray, y: np.ndarray, beta: np.ndarray, penalty: np.ndarray) -> float:
    """Sum of log-losses plus 0.5 * l2 * ||w||^2 (intercept unpenalised)."""
    z = Z @ beta
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.dot(penalty * beta, beta))


def fit_logistic(
    X: np.ndarray, y: np.ndarray, l2: float = 1.0, max_iter: int = 200
) -> LogisticModel:
    """Fit L2-regularised logistic regression by damped Newton (IRLS) steps.

    Minimises ``sum_i logloss_i + 0.5 * l2 * ||w||^2`` over standardised features; the
    intercept is not penalised. NaNs are imputed with the training column mean, constant
    columns get weight 0, and ``l2 > 0`` keeps the weights finite on separable data.
    With a single class present the weights are 0 and the intercept is the (clipped)
    log-odds of that base rate.
    """
    X = _as_2d(X)
    y = _as_labels(y, X.shape[0])
    if X.shape[0] == 0:
        raise ValueError("cannot fit on zero rows")
    if not np.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")
    if np.isinf(X).any():
        raise ValueError("X contains infinite values")
    mean, std = standardize_fit(X)
    Xs = (np.where(np.isnan(X), mean, X) - mean) / std
    n, d = Xs.shape

    rate = float(y.mean())
    if rate in (0.0, 1.0):
        p = min(max(rate, 1e-12), 1.0 - 1e-12)
        return LogisticModel(
            impute=mean, mean=mean, std=std, coef=np.zeros(d),
            intercept=float(np.log(p / (1.0 - p))), l2=float(l2), n_iter=0, converged=True,
        )  # fmt: skip

    Z = np.hstack([np.ones((n, 1)), Xs])
    penalty = np.r_[0.0, np.full(d, float(l2))]
    beta = np.zeros(d + 1)
    beta[0] = np.log(rate / (1.0 - rate))
    obj = _objective(Z, y, beta, penalty)
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        p = _sigmoid(Z @ beta)
        grad = Z.T @ (p - y) + penalty * beta
        w = p * (1.0 - p)
        hess = (Z * w[:, None]).T @ Z + np.diag(penalty)
        hess[np.diag_indices_from(hess)] += 1e-10  # guards a singular Hessian (l2 = 0)
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        slope = float(grad @ step)
        t = 1.0
        while True:  # backtracking (Armijo) line search
            cand = beta - t * step
            new_obj = _objective(Z, y, cand, penalty)
            if new_obj <= obj - 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        if new_obj > obj:  # no descent left at float precision: at the optimum
            converged = True
            break
        delta = float(np.max(np.abs(cand - beta)))
        improved = obj - new_obj
        beta, obj = cand, new_obj
        if delta < 1e-10 or improved < 1e-12 * max(1.0, abs(obj)):
            converged = True
            break
    return LogisticModel(
        impute=mean, mean=mean, std=std, coef=beta[1:].copy(), intercept=float(beta[0]),
        l2=float(l2), n_iter=it, converged=converged,
    )  # fmt: skip


# --------------------------------------------------------------------------- cross-fitting


def crossfit_folds(
    y: np.ndarray, groups: np.ndarray | None = None, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Fold id per row; whole groups go to one fold, stratified by each group's majority label.

    Groups (default: one per row) take the label of their majority (ties -> 1). Within each
    label, groups are shuffled by ``seed``, then placed largest-first into the fold with the
    fewest rows of that label (then fewest rows overall), which balances both class counts
    and fold sizes. With fewer groups than ``folds`` only that many folds are used.
    """
    y = _as_labels(y)
    n = len(y)
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    codes = _group_codes(groups, n)
    n_groups = int(codes.max()) + 1 if n else 0
    if n_groups < 2:
        raise ValueError(f"need at least 2 groups to cross-fit, got {n_groups}")
    k = min(folds, n_groups)
    size = np.bincount(codes, minlength=n_groups)
    pos = np.bincount(codes, weights=y, minlength=n_groups)
    glabel = (2 * pos >= size).astype(int)

    rng = np.random.default_rng(seed)
    group_fold = np.empty(n_groups, dtype=np.int64)
    total = np.zeros(k, dtype=np.int64)
    for label in (0, 1):
        members = np.flatnonzero(glabel == label)
        members = members[rng.permutation(len(members))]
        members = members[np.argsort(-size[members], kind="stable")]
        per_class = np.zeros(k, dtype=np.int64)
        for g in members:
            f = int(np.lexsort((np.arange(k), total, per_class))[0])
            group_fold[g] = f
            per_class[f] += size[g]
            total[f] += size[g]
    return group_fold[codes]


def crossfit_proba(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None = None,
    folds: int = 5,
    seed: int = 0,
    l2: float = 1.0,
    fold_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Out-of-fold member probabilities from L2 logistic regression.

    Each row is predicted exactly once, by a model fitted on the other folds only (which
    never contain a row of its group). Folds come from ``crossfit_folds(y, groups, folds,
    seed)`` unless ``fold_ids`` is given (then ``groups``/``folds``/``seed`` are ignored).
    If a training split holds a single class, its held-out rows get that split's base rate.
    """
    X = _as_2d(X)
    y = _as_labels(y, X.shape[0])
    if fold_ids is None:
        fold_ids = crossfit_folds(y, groups, folds=folds, seed=seed)
    else:
        fold_ids = np.asarray(fold_ids)
        if fold_ids.shape != y.shape:
            raise ValueError(f"fold_ids must have shape {y.shape}, got {fold_ids.shape}")
    out = np.full(len(y), np.nan)
    for f in np.unique(fold_ids):
        test = fold_ids == f
        train = ~test
        if not train.any():
            raise ValueError("a fold covers every row; need at least 2 folds")
        y_tr = y[train]
        if y_tr.min() == y_tr.max():
            out[test] = float(y_tr[0])
        else:
            out[test] = fit_logistic(X[train], y_tr, l2=l2).predict_proba(X[test])
    return out
