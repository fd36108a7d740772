"""Learned attackers: logistic fit and leakage-free cross-fitting."""

from __future__ import annotations

import numpy as np
import pytest

from clipaudit.reduce.learned import crossfit_folds, crossfit_proba, fit_logistic, standardize_fit


def pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(member score > non-member score) over all pairs, ties count half."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def separable(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3)) * np.array([1.0, 5.0, 0.2]) + np.array([3.0, -1.0, 0.0])
    w = np.array([1.0, -0.4, 2.0])
    y = ((X - [3.0, -1.0, 0.0]) @ w > 0).astype(int)
    return X, y, w


# --------------------------------------------------------------------------- standardize / logistic


def test_standardize_fit_floors_std_and_ignores_nans():
    X = np.array([[1.0, 5.0, np.nan], [3.0, 5.0, np.nan], [np.nan, 5.0, np.nan]])
    mean, std = standardize_fit(X)
    np.testing.assert_allclose(mean, [2.0, 5.0, 0.0])
    np.testing.assert_allclose(std, [1.0, 1e-8, 1.0])


def test_logistic_recovers_direction_on_separable_data():
    X, y, w = separable()
    model = fit_logistic(X, y, l2=1.0)
    assert model.converged
    assert np.isfinite(model.coef).all() and np.isfinite(model.intercept)
    p = model.predict_proba(X)
    assert p.shape == (len(y),) and np.all((p > 0) & (p < 1))
    assert pairwise_auc(p, y) > 0.999
    cos = model.coef_raw @ w / (np.linalg.norm(model.coef_raw) * np.linalg.norm(w))
    assert cos > 0.95
    # raw-space parametrisation gives the same log-odds
    np.testing.assert_allclose(X @ model.coef_raw + model.intercept_raw, model.decision_function(X))


def test_logistic_weaker_penalty_gives_larger_but_finite_weights():
    X, y, _ = separable()
    strong, weak = fit_logistic(X, y, l2=10.0), fit_logistic(X, y, l2=1e-3)
    assert np.isfinite(weak.coef).all()
    assert np.linalg.norm(weak.coef) > np.linalg.norm(strong.coef)


def test_logistic_is_deterministic():
    X, y, _ = separable(seed=3)
    a, b = fit_logistic(X, y), fit_logistic(X, y)
    np.testing.assert_array_equal(a.coef, b.coef)
    assert a.intercept == b.intercept


def test_logistic_single_feature_column_and_constant_column():
    rng = np.random.default_rng(1)
    x = rng.normal(size=300)
    y = (x + 0.5 * rng.normal(size=300) > 0).astype(int)
    m1 = fit_logistic(x, y)  # 1-D input is one column
    assert m1.n_features == 1 and m1.coef[0] > 0
    assert pairwise_auc(m1.predict_proba(x), y) > 0.85

    X = np.column_stack([x, np.full(300, 7.0)])
    m2 = fit_logistic(X, y)
    assert m2.coef[1] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(m2.predict_proba(X), m1.predict_proba(x), atol=1e-8)


def test_logistic_imputes_nans_with_training_mean():
    X, y, _ = separable(seed=2)
    Xn = X.copy()
    Xn[::7, 0] = np.nan
    Xn[3, 2] = np.nan
    model = fit_logistic(Xn, y)
    assert np.isfinite(model.coef).all()
    np.testing.assert_allclose(model.impute, np.nanmean(Xn, axis=0))
    p = model.predict_proba(Xn)
    assert np.isfinite(p).all() and pairwise_auc(p, y) > 0.9
    # a NaN at predict time behaves exactly like the remembered training mean
    row = np.array([[np.nan, 0.0, 0.0]])
    filled = np.array([[model.impute[0], 0.0, 0.0]])
    assert model.predict_proba(row)[0] == pytest.approx(model.predict_proba(filled)[0])


def test_logistic_single_class_predicts_base_rate_and_rejects_bad_input():
    X = np.random.default_rng(0).normal(size=(10, 2))
    assert np.all(fit_logistic(X, np.ones(10)).predict_proba(X) > 0.999)
    with pytest.raises(ValueError):
        fit_logistic(X, np.arange(10))
    with pytest.raises(ValueError):
        fit_logistic(X, np.ones(10), l2=-1.0)
    with pytest.raises(ValueError):
        fit_logistic(X, np.ones(10)).predict_proba(np.zeros((2, 3)))


# --------------------------------------------------------------------------- cross-fitting


def test_crossfit_predicts_every_row_once_without_group_leakage():
    rng = np.random.default_rng(0)
    n_groups = 60
    sizes = rng.integers(1, 6, size=n_groups)
    groups = np.repeat([f"person-{g}" for g in range(n_groups)], sizes)
    glabel = rng.integers(0, 2, size=n_groups)
    y = np.repeat(glabel, sizes)
    X = rng.normal(size=(len(y), 4)) + y[:, None] * 0.8

    fold = crossfit_folds(y, groups, folds=5, seed=0)
    assert fold.shape == y.shape and set(np.unique(fold)) == set(range(5))
    for g in np.unique(groups):  # every row of a group shares its fold
        assert len(np.unique(fold[groups == g])) == 1
    for f in range(5):  # stratified: every fold has both classes, sizes balanced
        assert 0 < y[fold == f].mean() < 1
    counts = np.bincount(fold)
    assert counts.max() - counts.min() <= 6

    p = crossfit_proba(X, y, groups, folds=5, seed=0)
    assert p.shape == y.shape and np.isfinite(p).all()
    # each row's prediction equals a model fitted on the other folds only
    for f in range(5):
        held = fold == f
        assert not set(groups[held]) & set(groups[~held])
        ref = fit_logistic(X[~held], y[~held]).predict_proba(X[held])
        np.testing.assert_allclose(p[held], ref)
    np.testing.assert_array_equal(p, crossfit_proba(X, y, groups, folds=5, seed=0))
    np.testing.assert_array_equal(p, crossfit_proba(X, y, fold_ids=fold))
    assert pairwise_auc(p, y) > 0.7


def test_crossfit_prediction_ignores_the_rows_own_label():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(30, 2))
    y = (X[:, 0] + rng.normal(size=30) > 0).astype(int)
    fold = crossfit_folds(y, folds=5, seed=1)
    base = crossfit_proba(X, y, fold_ids=fold)
    for i in range(len(y)):
        flipped = y.copy()
        flipped[i] = 1 - flipped[i]
        p = crossfit_proba(X, flipped, fold_ids=fold)
        assert p[i] == base[i]
        # the flip does reach the models that trained on row i
        assert not np.allclose(p[fold != fold[i]], base[fold != fold[i]])


def test_crossfit_on_noise_is_chance_while_in_sample_fit_overfits():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(400, 100))
    y = rng.integers(0, 2, size=400)
    oof = crossfit_proba(X, y, folds=5, seed=0, l2=1.0)
    in_sample = fit_logistic(X, y, l2=1.0).predict_proba(X)
    oof_auc, in_auc = pairwise_auc(oof, y), pairwise_auc(in_sample, y)
    assert 0.35 < oof_auc < 0.65
    assert in_auc > 0.72 and in_auc > oof_auc + 0.15


def test_crossfit_single_class_training_split_uses_base_rate():
    X = np.arange(10, dtype=float)[:, None]
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    groups = np.array([0, 0, 0, 1, 2, 3, 4, 5, 6, 7])
    fold = crossfit_folds(y, groups, folds=2, seed=0)
    p = crossfit_proba(X, y, groups, folds=2, seed=0)
    assert np.isfinite(p).all()
    np.testing.assert_array_equal(p[:3], 0.0)  # the other fold holds no member
    assert len(np.unique(fold[:3])) == 1


def test_crossfit_folds_edge_cases():
    y = np.array([0, 1, 0])
    assert set(crossfit_folds(y, folds=10)) == {0, 1, 2}  # fewer groups than folds
    with pytest.raises(ValueError):
        crossfit_folds(y, groups=[5, 5, 5])
    with pytest.raises(ValueError):
        crossfit_folds(y, folds=1)
    with pytest.raises(ValueError):
        crossfit_folds(y, groups=[1, 2])
