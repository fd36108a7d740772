"""Learned attackers: L2 logistic regression and cross-fitting by group (scikit-learn).

Conventions follow :mod:`clipaudit.core.statistics`: a higher score means "more
member-like" and members (label 1) are positives. Anything fitted on labelled rows is
evaluated only on held-out rows (cross-fitting), and all rows of one group (e.g. images of
one person) always land in the same fold, so no group is ever split between fitting and
evaluation.

Every function is deterministic given its inputs (and ``seed``).
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
    "MLPModel",
    "fit_mlp",
    "fit_model",
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


def fit_logistic(
    X: np.ndarray, y: np.ndarray, l2: float = 1.0, max_iter: int = 1000
) -> LogisticModel:
    """Fit L2-regularised logistic regression (scikit-learn's ``LogisticRegression``, lbfgs).

    Minimises ``sum_i logloss_i + 0.5 * l2 * ||w||^2`` over standardised features (scikit-learn
    writes it as ``C * sum_i logloss_i + 0.5 * ||w||^2``, so ``C = 1 / l2``); the intercept is
    not penalised. NaNs are imputed with the training column mean, constant columns get weight
    0, and ``l2 > 0`` keeps the weights finite on separable data. With a single class present
    the weights are 0 and the intercept is the (clipped) log-odds of that base rate. The result
    keeps only arrays, so a fitted attacker can be saved as JSON (no pickle).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

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
    d = Xs.shape[1]
    rate = float(y.mean())
    if rate in (0.0, 1.0):
        p = min(max(rate, 1e-12), 1.0 - 1e-12)
        return LogisticModel(
            impute=mean, mean=mean, std=std, coef=np.zeros(d),
            intercept=float(np.log(p / (1.0 - p))), l2=float(l2), n_iter=0, converged=True,
        )  # fmt: skip
    model = LogisticRegression(C=1.0 / l2 if l2 > 0 else 1e12, tol=1e-8, max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(Xs, y.astype(int))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return LogisticModel(
        impute=mean, mean=mean, std=std, coef=model.coef_[0].astype(np.float64).copy(),
        intercept=float(model.intercept_[0]), l2=float(l2), n_iter=int(model.n_iter_[0]), converged=converged,
    )  # fmt: skip


# --------------------------------------------------------------------------- small MLP


@dataclass(frozen=True)
class MLPModel:
    """Fitted one-hidden-layer MLP attacker (ReLU, logistic output) on standardised features;
    arrays only, so it saves as JSON and predicts with numpy."""

    impute: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    alpha: float
    n_iter: int
    converged: bool

    @property
    def n_features(self) -> int:
        return int(self.weights[0].shape[0])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = _as_2d(X)
        if X.shape[1] != self.n_features:
            raise ValueError(f"X has {X.shape[1]} features, model was fitted on {self.n_features}")
        h = (np.where(np.isnan(X), self.impute, X) - self.mean) / self.std
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = np.maximum(h @ w + b, 0.0)
        return _sigmoid((h @ self.weights[-1] + self.biases[-1]).ravel())


#: lbfgs iterations of an MLP attacker: on the lab's few hundred rows the fit rarely converges before
#: 500, and 500 took 2.5× as long as 200 (measured: the demo's metrics step 23.6 → 12.1 s) for AUCs
#: within the refits' spread
MLP_MAX_ITER = 200


def fit_mlp(X: np.ndarray, y: np.ndarray, hidden: int = 32, alpha: float = 1e-2, seed: int = 0,
            max_iter: int = MLP_MAX_ITER) -> MLPModel | LogisticModel:
    """scikit-learn's ``MLPClassifier`` (one hidden layer, L2 ``alpha``, lbfgs, fixed seed) on
    standardised, mean-imputed features; a single class gives :func:`fit_logistic`'s base rate."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    X = _as_2d(X)
    y = _as_labels(y, X.shape[0])
    if y.min() == y.max():
        return fit_logistic(X, y)
    mean, std = standardize_fit(X)
    Xs = (np.where(np.isnan(X), mean, X) - mean) / std
    model = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=alpha, solver="lbfgs", max_iter=max_iter,
                          random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(Xs, y.astype(int))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return MLPModel(impute=mean, mean=mean, std=std, weights=tuple(w.astype(np.float64) for w in model.coefs_),
                    biases=tuple(b.astype(np.float64) for b in model.intercepts_), alpha=alpha,
                    n_iter=int(model.n_iter_), converged=converged)


def fit_model(kind: str, X: np.ndarray, y: np.ndarray, seed: int = 0, l2: float = 1.0) -> LogisticModel | MLPModel:
    """``logistic`` or ``mlp``."""
    if kind == "mlp":
        return fit_mlp(X, y, seed=seed)
    if kind == "logistic":
        return fit_logistic(X, y, l2=l2)
    raise ValueError(f"unknown attacker model {kind!r}")


# --------------------------------------------------------------------------- cross-fitting


def crossfit_folds(
    y: np.ndarray, groups: np.ndarray | None = None, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Fold id per row from scikit-learn's ``StratifiedGroupKFold`` (shuffled by ``seed``):
    whole groups go to one fold (default: one group per row), class shares kept as even as the
    groups allow. With fewer groups than ``folds`` only that many folds are used."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    y = _as_labels(y)
    n = len(y)
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    codes = _group_codes(groups, n)
    n_groups = int(codes.max()) + 1 if n else 0
    if n_groups < 2:
        raise ValueError(f"need at least 2 groups to cross-fit, got {n_groups}")
    k = min(folds, n_groups)
    out = np.empty(n, dtype=np.int64)
    labels = y.astype(int)
    if k > np.bincount(labels).max():  # too few rows of every class to stratify: plain group folds
        from sklearn.model_selection import GroupKFold

        splits = GroupKFold(n_splits=k).split(np.zeros(n), labels, codes)
    else:
        splits = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(n), labels, codes)
    with warnings.catch_warnings():  # a class with fewer groups than folds is fine here: said in the docstring
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, test) in enumerate(splits):
            out[test] = f
    return out


def crossfit_proba(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None = None,
    folds: int = 5,
    seed: int = 0,
    l2: float = 1.0,
    fold_ids: np.ndarray | None = None,
    kind: str = "logistic",
) -> np.ndarray:
    """Out-of-fold member probabilities from an L2 logistic regression (or ``kind="mlp"``).

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
            out[test] = fit_model(kind, X[train], y_tr, seed=seed, l2=l2).predict_proba(X[test])
    return out
