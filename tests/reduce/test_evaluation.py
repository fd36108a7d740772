"""Image-side attacks and the validity check on canaries with known ground truth."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipaudit.reduce.labels import Labels, read_labels
from clipaudit.runner import run_job
from clipaudit.spec import load_spec

pytestmark = pytest.mark.slow

SMALL = dict(n_identities=16, steps=200, shards=2, n_distractor_names=100, train_images=5,
             candidate_images=5, include_train_images=True)


def _lab(tmp_path_factory, name, **kw):
    from clipaudit.lab.build import LabConfig, build_lab

    return build_lab(tmp_path_factory.mktemp(name), LabConfig(**{**SMALL, **kw}), log=lambda *a: None)


def _run(job, out, **compute):
    spec = load_spec(job)
    spec = spec.model_copy(update={"output": out, "compute": spec.compute.model_copy(update={"executor": "local", **compute})})
    return run_job(spec, progress=False)


@pytest.fixture(scope="module")
def iid(tmp_path_factory):
    lab = _lab(tmp_path_factory, "iid")
    return lab, _run(lab.job, lab.root / "o-trained"), _run(lab.job_untrained, lab.root / "o-untrained")


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    lab = _lab(tmp_path_factory, "shifted", nonmember_style="shifted")
    return lab, _run(lab.job, lab.root / "o-trained")


IMAGE_ATTACKS = ("encodermi", "partcrop", "mim", "caption")


def test_an_image_level_attack_finds_training_photos_and_the_control_does_not(iid):
    _, trained, untrained = iid
    best = max(trained.metrics[a]["auc"] for a in IMAGE_ATTACKS)
    assert all(trained.metrics[a]["level"] == "image" for a in IMAGE_ATTACKS)
    assert best >= 0.7, {a: trained.metrics[a]["auc"] for a in IMAGE_ATTACKS}
    control = [untrained.metrics[a]["auc"] for a in IMAGE_ATTACKS]
    assert max(abs(a - 0.5) for a in control) < 0.15, control


def test_iid_canary_raises_no_shift_warning_but_shifted_one_does(iid, shifted):
    assert iid[1].metrics["distribution_shift_warning"] is False
    m = shifted[1].metrics
    assert m["distribution_shift_warning"] is True
    levels = m["baseline"].get("by_level", [m["baseline"]])
    assert max(b["auc"] for b in levels) >= 0.9


def test_metrics_shape_roc_table_and_intervals(iid):
    _, trained, _ = iid
    m = json.loads((trained.layout.root / "metrics.json").read_text())
    for a in ("idia",) + IMAGE_ATTACKS:
        for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr"):
            lo, hi = m[a][f"{k}_ci"]  # (whether they are right: tests/reduce/test_statistics.py)
            assert 0 <= lo <= hi <= 1, (a, k, lo, hi)
        assert m[a]["n_members"] > 0 and m[a]["n_nonmembers"] > 0
    s = m["encodermi"]["learned_set"]  # EncoderMI's three variants: threshold, vector, set
    assert s["level"] == "image" and 0 <= s["auc_ci"][0] <= s["auc_ci"][1] <= 1 and "set" in s["variant"]
    roc = pq.read_table(trained.layout.root / "roc.parquet").to_pylist()
    assert {r["attack"] for r in roc} >= {"idia", *IMAGE_ATTACKS, "baseline"}
    assert {r["variant"] for r in roc if r["attack"] == "encodermi"} == {"threshold", "learned", "learned_set"}
    for attack in IMAGE_ATTACKS:
        pts = [r for r in roc if r["attack"] == attack and r["variant"] == "threshold"]
        assert pts[0]["fpr"] == 0 and pts[-1]["tpr"] == 1
        assert all(a["fpr"] <= b["fpr"] for a, b in zip(pts, pts[1:]))


def test_rerun_gives_identical_scores_and_batching_does_not_matter(iid, tmp_path):
    lab, trained, _ = iid
    again = _run(lab.job, tmp_path / "again")
    other = _run(lab.job, tmp_path / "b3", batch_size=3)
    cols = ["shard", "position", "encodermi_score", "partcrop_score", "mim_score", "mim_features"]

    def table(r):
        return sorted(pq.read_table(r.layout.root / "samples", columns=cols).to_pylist(),
                      key=lambda x: (x["shard"], x["position"]))

    assert table(again) == table(trained)
    for a, b in zip(table(other), table(trained)):
        for c in ("encodermi_score", "partcrop_score", "mim_score"):
            assert a[c] == pytest.approx(b[c], abs=1e-4)


def test_set_pooling_is_order_invariant_and_keeps_missing_rows_missing():
    from clipaudit.attacks.encodermi import set_pooling

    rng = np.random.default_rng(0)
    X = rng.uniform(-0.2, 1.0, (5, 45))
    X[3] = np.nan
    shuffled = np.array([rng.permutation(r) for r in X])
    a, b = set_pooling(X), set_pooling(shuffled)
    assert np.allclose(a[~np.isnan(a).any(1)], b[~np.isnan(b).any(1)])
    assert np.isnan(a[3]).all() and not np.isnan(a[[0, 1, 2, 4]]).any()
    assert np.allclose(a[[0, 1, 2, 4], :10].sum(1), 1.0)  # histogram shares
    assert set_pooling(np.ones((1, 3)))[0, 9] == 1.0  # cosine 1 falls in the top bin


def test_labels_file_with_identity_and_image_rows(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("identity,shard,key,member\nAnn Lee,,,true\n,data/00001.tar,000010003,false\n")
    labels = read_labels(p)
    assert labels == Labels({"Ann Lee": True}, {("00001.tar", "000010003"): False})


def test_image_labels_match_rows_in_the_outputs(iid):
    lab, trained, _ = iid
    labels = read_labels(lab.labels)
    n_train_photos = sum(labels.images.values())
    assert n_train_photos == len(lab.members) * SMALL["train_images"]
    assert trained.metrics["caption"]["n_members"] == n_train_photos
    assert np.isclose(trained.metrics["caption"]["n_nonmembers"], len(labels.images) - n_train_photos)


def test_partcrop_finds_single_training_photos_on_the_overfit_canary(tmp_path_factory):
    """One photo per member, augmented training: PartCrop alone (no caption) finds the photos."""
    from clipaudit.lab.build import build_lab
    from clipaudit.lab.demo import LAB_PRESETS

    lab = build_lab(tmp_path_factory.mktemp("overfit"), LAB_PRESETS["overfit"], log=lambda *a: None)
    aucs = {}
    for label, job in (("trained", lab.job), ("untrained", lab.job_untrained)):
        spec = load_spec(job)
        only_partcrop = spec.attacks.model_copy(update={"idia": None, "encodermi": None, "mim": None, "caption": None})
        spec = spec.model_copy(update={"attacks": only_partcrop, "output": lab.root / f"o-{label}",
                                       "compute": spec.compute.model_copy(update={"executor": "local"})})
        aucs[label] = run_job(spec, progress=False).metrics["partcrop"]
    assert aucs["trained"]["level"] == "image" and aucs["trained"]["n_members"] == 20
    assert aucs["trained"]["auc"] >= 0.7 and aucs["trained"]["auc_ci"][0] > 0.5, aucs["trained"]
    assert abs(aucs["untrained"]["auc"] - 0.5) < 0.15, aucs["untrained"]
