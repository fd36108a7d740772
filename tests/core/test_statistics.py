import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from clipaudit.core.statistics import auc, membership_metrics, roc_curve, tpr_at_fpr


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)
    y = rng.random(60) < 0.5
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auc(s, y) == pytest.approx(pairwise)


def test_perfect_and_constant_scores():
    y = np.array([1, 1, 0, 0], bool)
    assert auc(np.array([3, 2, 1, 0.0]), y) == 1.0
    assert auc(np.zeros(4), y) == 0.5
    assert tpr_at_fpr(np.zeros(4), y, 0.01) == 0.0  # a tie with non-members admits no member


def test_tpr_at_low_fpr_allows_no_false_positive_with_few_negatives():
    s = np.array([10, 9, 8, 7, 6.5, 5, 1, 0])
    y = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)
    assert tpr_at_fpr(s, y, 0.001) == pytest.approx(0.75)
    assert tpr_at_fpr(s, y, 0.25) == pytest.approx(1.0)
    roc = roc_curve(s, y)
    assert roc.fpr[0] == 0 and roc.tpr[-1] == 1 and np.all(np.diff(roc.fpr) >= 0)


def test_tpr_at_a_rate_the_nonmembers_cannot_resolve_is_null_with_a_note():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(300, bool), np.zeros(150, bool)]
    s = y + rng.normal(0, 0.8, len(y))
    m = membership_metrics(s, y, n_boot=300)
    assert m["n_members"] == 300 and m["n_nonmembers"] == 150
    assert m["tpr_at_1pct_fpr"] is not None and m["tpr_at_1pct_fpr_ci"] is not None  # 150 >= 100
    assert m["tpr_at_0_1pct_fpr"] is None and m["tpr_at_0_1pct_fpr_ci"] is None
    assert m["tpr_at_0_1pct_fpr_note"] == "needs >= 1000 non-members at this level, has 150"
    assert m["auc_ci"][1] - m["auc_ci"][0] > 0.02


def test_cluster_bootstrap_is_wider_when_images_of_one_person_move_together():
    """40 identities × 10 near-identical images: resampling images as if independent gives a
    far too narrow interval; resampling identities gives the honest one."""
    rng = np.random.default_rng(2)
    ident_member = rng.random(40) < 0.5
    ident_score = ident_member * 0.5 + rng.normal(0, 1, 40)
    groups = np.repeat(np.arange(40), 10)
    y = ident_member[groups]
    s = ident_score[groups] + rng.normal(0, 0.01, len(groups))
    naive = membership_metrics(s, y, n_boot=400)
    cluster = membership_metrics(s, y, n_boot=400, groups=groups)
    width = lambda m: m["auc_ci"][1] - m["auc_ci"][0]  # noqa: E731
    assert cluster["auc"] == naive["auc"] and width(cluster) > 2.5 * width(naive)
    assert "whole identities" in cluster["interval"]


def test_refits_widen_the_interval_by_the_fitting_variance():
    rng = np.random.default_rng(4)
    y = rng.random(200) < 0.5
    base = y + rng.normal(0, 1, 200)
    refits = [base] + [base + rng.normal(0, 1.5, 200) for _ in range(4)]  # an unstable attacker
    alone = membership_metrics(base, y, n_boot=400)
    spread = membership_metrics(base, y, n_boot=400, score_sets=refits)
    each = [roc_auc_score(y, r) for r in refits]  # the point estimate is the mean of the refits' AUCs
    assert spread["auc"] == pytest.approx(np.mean(each)) and spread["auc"] != pytest.approx(alone["auc"])
    assert spread["auc_refit_std"] == pytest.approx(np.std(each))
    assert spread["auc_ci"][0] < alone["auc_ci"][0] and "over 5 refits" in spread["interval"]


def test_bootstrap_auc_intervals_cover_the_true_auc_about_95_percent_of_the_time():
    """Against the population, not the code: member scores ~ N(1, 1), non-members ~ N(0, 1)
    have AUC = Phi(1/sqrt 2) = 0.7602. Over 300 samples of 40 + 40, a 95 % interval must cover
    it about 95 % of the time (the percentile bootstrap runs a little under at this size:
    0.913 measured) and be about as wide as Hanley & McNeil's normal approximation (2 x 1.96
    x SE = 0.211; 0.200 measured). A 90 % or a 99 % interval, intervals of one class only or
    of the unresampled data fail one of the two."""
    from math import erf, sqrt

    true_auc = 0.5 * (1 + erf(0.5))  # Phi(1 / sqrt(2))
    rng = np.random.default_rng(11)
    y = np.r_[np.ones(40, bool), np.zeros(40, bool)]
    covered, widths = 0, []
    for _ in range(300):
        m = membership_metrics(rng.normal(size=80) + y, y, n_boot=200, seed=int(rng.integers(1 << 31)))
        assert m["n_members"] == 40 and m["n_nonmembers"] == 40
        lo, hi = m["auc_ci"]
        covered += lo <= true_auc <= hi
        widths.append(hi - lo)
    q1, q2 = true_auc / (2 - true_auc), 2 * true_auc**2 / (1 + true_auc)
    se = sqrt((true_auc * (1 - true_auc) + 39 * (q1 - true_auc**2) + 39 * (q2 - true_auc**2)) / (40 * 40))
    assert 0.88 <= covered / 300 <= 0.98, covered / 300
    assert 0.85 < np.mean(widths) / (2 * 1.96 * se) < 1.15, (np.mean(widths), 2 * 1.96 * se)


@pytest.mark.parametrize("ties", [False, True])
def test_fast_bootstrap_resample_equals_metrics_of_the_resampled_data(ties):
    from clipaudit.core.statistics import _point, _Resampler

    rng = np.random.default_rng(3)
    y = rng.random(3000) < 0.3
    s = rng.normal(size=3000) + y
    if ties:
        s = np.round(s, 1)
    resampler = _Resampler(s, y)
    for _ in range(5):
        idx = rng.integers(0, len(s), len(s))
        fast = resampler.point(np.bincount(idx, minlength=len(s)))
        slow = _point(s[idx], y[idx])
        assert fast == pytest.approx(slow, abs=1e-12)


def test_stratified_draw_keeps_class_sizes_and_matches_the_slow_metrics():
    from clipaudit.core.statistics import _point, _Resampler

    rng = np.random.default_rng(5)
    y = rng.random(500) < 0.2
    s = np.round(rng.normal(size=500) + y, 1)
    r = _Resampler(s, y)
    draw_rng = np.random.default_rng(9)
    fast = r.draw(draw_rng)
    # replay the same draw as explicit counts in the original order
    replay = np.random.default_rng(9)
    counts = np.zeros(len(s), dtype=int)
    pos_counts = np.bincount(replay.integers(0, y.sum(), y.sum()), minlength=y.sum())
    neg_counts = np.bincount(replay.integers(0, (~y).sum(), (~y).sum()), minlength=(~y).sum())
    counts[r.order[r.pos_at]] = pos_counts
    counts[r.order[r.neg_at]] = neg_counts
    assert counts[y].sum() == y.sum() and counts[~y].sum() == (~y).sum()
    idx = np.repeat(np.arange(len(s)), counts)
    assert fast == pytest.approx(_point(s[idx], y[idx]), abs=1e-12)


def test_at_image_level_the_one_over_fpr_rule_counts_non_member_people_not_images():
    """100 non-member photos of 5 people cannot resolve a TPR at 1 % FPR: the interval would rest
    on 5 independent units. 100 non-member people with one photo each can."""
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20, bool), np.zeros(100, bool)]
    s = rng.normal(size=120) + y
    few_people = np.r_[np.arange(20), 20 + np.arange(100) % 5]
    m = membership_metrics(s, y, n_boot=50, groups=few_people)
    assert m["n_nonmembers"] == 100 and m["n_nonmember_groups"] == 5
    assert m["tpr_at_1pct_fpr"] is None and m["tpr_at_1pct_fpr_ci"] is None
    assert m["tpr_at_1pct_fpr_note"].startswith("needs >= 100 non-member identities at this level, has 5")
    many_people = np.arange(120)
    m = membership_metrics(s, y, n_boot=50, groups=many_people)
    assert m["tpr_at_1pct_fpr"] is not None and "tpr_at_1pct_fpr_note" not in m


def test_fold_averaged_auc_is_unbiased_on_noise_where_the_pooled_one_falls_below_chance():
    """No signal, folds by identity, each member identity with one member photo and a varying
    number of non-member photos, few identities: pooled out-of-fold scores come from models
    whose training class share moves against their test share, and their AUC sits below 0.5;
    the mean of each fold's own AUC does not (measured over 200 seeded repetitions)."""
    from clipaudit.reduce.learned import crossfit_folds, crossfit_proba

    pooled, averaged = [], []
    for rep in range(200):
        rng = np.random.default_rng(rep)
        sizes = rng.integers(1, 12, 8)
        groups = np.r_[np.repeat(np.arange(8), sizes + 1), np.repeat(np.arange(8, 14), 6)]
        y = np.r_[np.concatenate([[True] + [False] * n for n in sizes]), np.zeros(36, dtype=bool)]
        x = rng.normal(size=(len(y), 2))
        folds = crossfit_folds(y, groups, folds=5, seed=rep)
        s = crossfit_proba(x, y, fold_ids=folds)
        pooled.append(auc(s, y))
        averaged.append(membership_metrics(s, y, n_boot=0, groups=groups, folds=[folds])["auc"])
    assert np.mean(pooled) < 0.46
    assert abs(np.mean(averaged) - 0.5) < 0.03


def test_fold_averaged_roc_is_the_mean_of_each_folds_curve():
    from clipaudit.core.statistics import fold_averaged_roc, roc_curve

    s = np.array([0.9, 0.1, 0.8, 0.7, 0.3, 0.2, 0.6, 0.5])
    y = np.array([True, False, False, True, True, False, True, False])
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    roc = fold_averaged_roc(s, y, folds)
    a, b = roc_curve(s[:4], y[:4]), roc_curve(s[4:], y[4:])

    def at(c, x):
        return c.tpr[c.fpr <= x + 1e-12].max()

    for f, t in zip(roc.fpr, roc.tpr):
        assert t == pytest.approx((at(a, f) + at(b, f)) / 2)
    assert roc.fpr[0] == 0 and roc.fpr[-1] == 1 and roc.tpr[-1] == 1 and np.isnan(roc.thresholds).all()
    m = membership_metrics(s, y, n_boot=200, folds=[folds])
    assert m["auc"] == pytest.approx((auc(s[:4], y[:4]) + auc(s[4:], y[4:])) / 2) and m["averaged_over_folds"] == 2
    assert "averaged over the cross-fitting folds" in m["interval"]


@pytest.mark.parametrize("ties", [False, True])
def test_vectorised_resamples_equal_one_resample_at_a_time(ties):
    from clipaudit.core.statistics import _FoldAveraged, _Resampler

    rng = np.random.default_rng(4)
    s = rng.integers(0, 6, 60).astype(float) if ties else rng.normal(size=60)
    y = rng.random(60) < 0.3
    folds = rng.integers(0, 3, 60)
    counts = rng.integers(0, 3, size=(25, 60)).astype(float)
    counts[0, y] = 0  # a resample without members: nan, not a number
    one, many = _Resampler(s, y), _Resampler(s, y).points(counts)
    fa = _FoldAveraged(s, y, folds)
    together = fa.points(counts)
    for b in range(1, 25):
        for key, v in one.point(counts[b]).items():
            assert many[key][b] == pytest.approx(v)
        alone = fa.point(counts[b])
        for key, v in (alone or {}).items():
            assert together[key][b] == pytest.approx(v)
    assert np.isnan(many["auc"][0])


def test_paired_auc_difference_cancels_what_both_share_and_finds_a_real_gap():
    from clipaudit.core.statistics import AucEstimate, paired_auc_difference

    rng = np.random.default_rng(2)
    y = rng.random(300) < 0.4
    strong, noise = y + rng.normal(0, 0.8, 300), rng.normal(size=300)
    same = paired_auc_difference(AucEstimate([(strong, None)]), AucEstimate([(strong, None)]), y)
    assert same["auc_difference"] == 0 and same["auc_difference_ci"] == [0.0, 0.0]
    gap = paired_auc_difference(AucEstimate([(strong, None)]), AucEstimate([(noise, None)]), y)
    assert gap["auc_difference"] == pytest.approx(auc(strong, y) - auc(noise, y))
    assert 0 < gap["auc_difference_ci"][0] < gap["auc_difference"] < gap["auc_difference_ci"][1]
    # the paired interval of two close scores is narrower than the two marginal intervals would suggest
    near = strong + rng.normal(0, 0.05, 300)
    close = paired_auc_difference(AucEstimate([(near, None)]), AucEstimate([(strong, None)]), y)
    lo, hi = close["auc_difference_ci"]
    marginal = membership_metrics(strong, y)["auc_ci"]
    assert hi - lo < (marginal[1] - marginal[0]) / 3


def test_a_refitted_estimate_is_the_mean_over_its_refits_and_its_interval_cycles_through_them():
    from clipaudit.core.statistics import AucEstimate, paired_auc_difference

    rng = np.random.default_rng(5)
    y = rng.random(200) < 0.5
    base = rng.normal(size=200)
    refits = [y + rng.normal(0, s, 200) for s in (0.5, 3.0)]  # one stable, one unstable fit
    diff = paired_auc_difference(AucEstimate([(r, None) for r in refits]), AucEstimate([(base, None)]), y)
    assert diff["auc_difference"] == pytest.approx(np.mean([roc_auc_score(y, r) for r in refits])
                                                   - roc_auc_score(y, base))
    each = [paired_auc_difference(AucEstimate([(r, None)]), AucEstimate([(base, None)]), y)["auc_difference"]
            for r in refits]
    # resamples alternate between the fits, so the interval covers what either fit alone would say
    # (an interval of the mean of both per resample would be narrow and miss both)
    lo, hi = diff["auc_difference_ci"]
    assert lo < min(each) and max(each) < hi
