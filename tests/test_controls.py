"""Known non-member controls: reading them, and p-values / flags / thresholds from them."""

import numpy as np
import pytest

from clipaudit.controls import control_set, pvalues, read_controls, threshold_entry
from clipaudit.evaluate import Labels, LabelsError


def test_read_controls_identities_and_images(tmp_path):
    f = tmp_path / "controls.csv"
    f.write_text("identity,shard,key,member\nAnn  Lee,,,false\n,data/00001.tar,k7,\nBob Stone,,,no\n")
    c = read_controls(f)
    assert c.identities == {"Ann Lee", "Bob Stone"} and c.images == {("00001.tar", "k7")}


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
