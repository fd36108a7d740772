"""Conformal calibration: thresholds and p-values from controls; reading controls files."""

import numpy as np
import pytest

from clipaudit.reduce.conformal import conformal_threshold, empirical_pvalues, pvalues, threshold_entry
from clipaudit.data.labels import Labels, LabelsError, control_set, read_controls


def test_read_controls_identities_and_images(tmp_path):
    f = tmp_path / "controls.csv"
    f.write_text("identity,shard,key,member\nAnn  Lee,,,false\n,data/00001.tar,k7,\nBob Stone,,,no\n")
    c = read_controls(f)
    assert c.identities == {"Ann Lee", "Bob Stone"} and c.images == {("data/00001.tar", "k7")}


@pytest.mark.parametrize("text,match", [
    ("name\nAnn\n", "needs a header"),
    ("identity,member\nAnn,true\n", "line 2: a control must be a non-member"),
])
def test_bad_controls_files(tmp_path, text, match):
    f = tmp_path / "c.csv"
    f.write_text(text)
    with pytest.raises(LabelsError, match=match):
        read_controls(f)


def test_control_set_adds_labelled_nonmembers(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("identity\nZoe\n")
    labels = Labels({"Ann": True, "Bob": False}, {("0.tar", "a"): False, ("0.tar", "b"): True})
    c = control_set(f, labels)
    assert c.identities == {"Zoe", "Bob"} and c.images == {("0.tar", "a")}
    assert not control_set(None, None)


def test_pvalues_leave_the_control_itself_out():
    s = np.array([5.0, 1.0, 2.0, 3.0, np.nan])
    is_control = np.array([False, True, True, True, False])
    p, c = pvalues(s, is_control)
    assert list(c) == [1.0, 2.0, 3.0]
    assert p[0] == pytest.approx(1 / 4)  # no control reaches 5
    assert p[3] == pytest.approx(1 / 3)  # 3 against the other controls {1, 2}: (1 + 0) / (1 + 2)
    assert p[1] == pytest.approx(1.0) and np.isnan(p[4])
    assert np.isnan(pvalues(s, np.array([True, False, False, False, False]))[0]).all()  # < 2 controls


def test_threshold_entry_says_when_there_are_too_few_controls():
    e = threshold_entry(np.arange(20.0), n_scored=30, flagged=0, controls_flagged=0, target_fpr=0.01)
    assert e["threshold"] is None and e["min_attainable_fpr"] == pytest.approx(1 / 21)
    assert "at least 99 are needed" in e["note"]
    ok = threshold_entry(np.arange(199.0), n_scored=300, flagged=4, controls_flagged=2, target_fpr=0.01)
    assert ok["threshold"] > 197.0 and "note" not in ok and ok["controls_fpr_leave_one_out"] == 2 / 199
    grouped = threshold_entry(np.arange(199.0), 300, 4, 2, 0.01, control_groups=5)
    assert "only 5 identities" in grouped["note"] and grouped["control_identities"] == 5


def test_a_control_labelled_member_is_an_error(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("identity\nAnn\n")
    with pytest.raises(LabelsError, match="labelled members.*'Ann'"):
        control_set(f, Labels({"Ann": True}))


# --------------------------------------------------------------------------- thresholds / p-values


def test_empirical_pvalues_range_monotone_and_uniform_under_null():
    rng = np.random.default_rng(0)
    controls = rng.normal(size=2000)
    grid = np.linspace(-5, 5, 201)
    p = empirical_pvalues(grid, controls)
    assert np.all((p > 0) & (p <= 1))
    assert np.all(np.diff(p) <= 0)
    assert p[0] == 1.0 and p[-1] == pytest.approx(1 / 2001)
    assert empirical_pvalues([controls.max()], controls)[0] == pytest.approx(2 / 2001)

    null = empirical_pvalues(rng.normal(size=4000), controls)
    u = np.sort(null)
    ecdf = np.arange(1, len(u) + 1) / len(u)
    assert np.max(np.abs(ecdf - u)) < 0.06
    for alpha in (0.01, 0.05, 0.2):
        assert np.mean(null <= alpha) <= alpha + 0.02
    with pytest.raises(ValueError):
        empirical_pvalues([0.0], [])


@pytest.mark.parametrize("n,alpha", [(9, 0.1), (99, 0.01), (50, 0.05), (10, 0.3), (5, 0.01)])
def test_conformal_threshold_matches_pvalue_flags(n, alpha):
    rng = np.random.default_rng(n)
    controls = rng.normal(size=n)
    scores = np.concatenate([rng.normal(size=500), controls, np.nextafter(controls, np.inf)])
    t = conformal_threshold(controls, alpha)
    flags_p = empirical_pvalues(scores, controls) <= alpha
    assert np.array_equal(scores >= t, flags_p)
    if alpha < 1 / (n + 1):
        assert t == np.inf and not flags_p.any()  # too few controls: nothing can be flagged at that rate


def test_conformal_threshold_false_positive_rate_on_fresh_nonmembers():
    rng = np.random.default_rng(7)
    rates = []
    for _ in range(200):
        t = conformal_threshold(rng.normal(size=199), 0.05)
        rates.append(np.mean(rng.normal(size=200) >= t))
    assert np.mean(rates) <= 0.05 + 0.005  # valid on average over control draws
    assert np.mean(rates) >= 0.03  # and not needlessly conservative
    with pytest.raises(ValueError):
        conformal_threshold([1.0, 2.0], 0.0)


def test_the_log_and_the_report_count_the_same_control_images(small_audit, caplog, capsys):
    """Controls named by identity: the image calibration uses those identities' images, and the run
    log, calibration.json and the report's table say the same number in the same words."""
    import json
    import logging
    import re

    from clipaudit.cli import main

    with caplog.at_level(logging.INFO, logger="clipaudit"):
        assert main(["reduce", str(small_audit)]) == 0
    out = capsys.readouterr().out
    cal = json.loads((small_audit / "calibration.json").read_text())
    used = cal["controls"]["images_used"]
    assert used == max(e["n_controls"] for e in cal["image"].values()) > 0
    words = f"3 control identities and {used} control images (the images of the control identities)"
    assert any(m.startswith("calibration in") and words in m for m in caplog.messages), caplog.messages
    assert f"from {words}" in out
    table = [int(n) for n in re.findall(r"^\s+image\s+\S+\s+(\d+) controls", out, flags=re.M)]
    assert table and max(table) == used


def test_qvalues_are_benjamini_hochberg_of_the_pvalues_over_the_candidates(small_audit):
    """Every <score>_qvalue (identities and sample_scores) is BH (scipy) of that score's p-values
    over the non-control units; controls get none; discoveries are q <= calibration.fdr; the
    combined membership p-value is the Cauchy combination of the identity's p-values."""
    import json
    import math

    import pyarrow.parquet as pq
    from scipy.stats import false_discovery_control

    fdr = json.loads((small_audit / "calibration.json").read_text())["fdr"]
    tables = {"identities": pq.read_table(small_audit / "identities.parquet").to_pylist(),
              "sample_scores": pq.read_table(small_audit / "sample_scores").to_pylist()}
    checked = 0
    for name, rows in tables.items():
        for score in sorted(c.removesuffix("_pvalue") for c in rows[0] if c.endswith("_pvalue")):
            if score == "membership":
                continue
            have = [r for r in rows if r[f"{score}_pvalue"] is not None]
            candidates = [r for r in have if not r["is_control"]]
            if not candidates:
                continue
            expected = false_discovery_control([r[f"{score}_pvalue"] for r in candidates], method="bh")
            assert [r[f"{score}_qvalue"] for r in candidates] == pytest.approx(list(expected)), (name, score)
            assert [r[f"{score}_discovery"] for r in candidates] == [bool(q <= fdr) for q in expected]
            assert all(r[f"{score}_qvalue"] is None and r[f"{score}_discovery"] is None
                       for r in have if r["is_control"])
            checked += 1
    assert checked >= 4
    ident = tables["identities"]
    pcols = [c for c in ident[0] if c.endswith("_pvalue") and c != "membership_pvalue"]
    for r in ident:
        ps = [r[c] for c in pcols if r[c] is not None]
        t = sum(math.tan((0.5 - p) * math.pi) for p in ps) / len(ps)
        assert r["membership_pvalue"] == pytest.approx(0.5 - math.atan(t) / math.pi)
    candidates = [r for r in ident if not r["is_control"]]
    expected = false_discovery_control([r["membership_pvalue"] for r in candidates], method="bh")
    assert [r["membership_qvalue"] for r in candidates] == pytest.approx(list(expected))
    assert {r["identity"] for r in ident if r["is_control"]} == {"P5", "P6", "P7"}


def test_identity_means_are_compared_with_controls_at_the_same_number_of_images():
    """Non-member candidates with 2 images each against controls with 40: their means vary
    more, so against the controls' full means far more than 5 % fall below p = 0.05; against
    the controls' means over 2 random images each, about 5 % do."""
    from clipaudit.reduce.conformal import count_matched_pvalues, pvalues

    rng = np.random.default_rng(0)
    controls = [rng.normal(size=40) for _ in range(2000)]  # the conditional rate's spread: ~0.005
    candidates = [rng.normal(size=2) for _ in range(5000)]
    values = np.array([x.mean() for x in controls + candidates])
    counts = np.array([len(x) for x in controls + candidates])
    is_control = np.arange(len(values)) < len(controls)
    naive, _ = pvalues(values, is_control)
    matched = count_matched_pvalues(values, counts, is_control, dict(enumerate(controls)), seed=1)
    assert np.mean(naive[~is_control] <= 0.05) > 0.3
    assert abs(np.mean(matched[~is_control] <= 0.05) - 0.05) < 0.015, np.mean(matched[~is_control] <= 0.05)
    # a control is compared with the other controls only, at its own count: the usual leave-one-out value
    np.testing.assert_allclose(matched[is_control], naive[is_control])
    again = count_matched_pvalues(values, counts, is_control, dict(enumerate(controls)), seed=1)
    np.testing.assert_array_equal(matched, again)  # seeded


def test_an_identity_without_an_ok_image_gets_no_count_matched_pvalue():
    from clipaudit.reduce.conformal import count_matched_pvalues

    controls = {0: np.array([0.1, 0.2]), 1: np.array([0.3, 0.5]), 2: np.array([0.2])}
    values = np.array([0.15, 0.4, 0.2, 0.9, np.nan])
    p = count_matched_pvalues(values, [2, 2, 1, 2, None], np.array([True, True, True, False, False]), controls)
    assert np.isnan(p[4]) and p[3] == pytest.approx(1 / 4)  # above all three controls' 2-image means
