"""Learned attackers score every candidate, are saved without pickle, and apply across audits."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipaudit.io.outputs import OutputLayout
from clipaudit.reduce.attackers import (MIN_WEAK, PSEUDO_QUANTILE, Attacker, AttackerError, fit_and_score, load,
                                        pseudo_labels, save)
from clipaudit.reduce.learned import fit_logistic


def test_labelled_rows_get_out_of_fold_scores_and_the_rest_the_full_model():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 4)
    y = np.where(groups < 10, 1, np.where(groups < 20, 0, -1)).astype(np.int8)  # 10 unlabelled identities
    X = rng.normal(size=(120, 3)) + (groups < 10)[:, None] * 1.5
    scores, model = fit_and_score(X, y, groups)
    assert not np.isnan(scores).any()
    rest = y < 0
    assert np.allclose(scores[rest], model.predict_proba(X[rest]))
    labelled = ~rest
    assert not np.allclose(scores[labelled], model.predict_proba(X[labelled]))  # out-of-fold, not in-sample
    assert fit_and_score(X, np.where(y == 0, 1, y).astype(np.int8), groups) is None  # one class only


def test_an_mlp_attacker_round_trips_through_json(tmp_path):
    from clipaudit.reduce.learned import MLP_MAX_ITER, fit_mlp

    rng = np.random.default_rng(2)
    X = rng.normal(size=(80, 5))
    y = (X[:, 0] * X[:, 1] > 0)  # not linearly separable
    a = Attacker("partcrop", "learned_mlp", 2, fit_mlp(X, y, seed=0))
    save([a], OutputLayout(tmp_path))
    (back,) = load(tmp_path / "attackers")
    assert np.allclose(back.model.predict_proba(X), a.model.predict_proba(X))
    from sklearn.neural_network import MLPClassifier  # the numpy forward pass equals scikit-learn's own

    ref = MLPClassifier(hidden_layer_sizes=(32,), alpha=1e-2, solver="lbfgs", max_iter=MLP_MAX_ITER,
                        random_state=0)
    ref.fit((X - X.mean(0)) / X.std(0), y.astype(int))
    assert np.allclose(back.model.predict_proba(X), ref.predict_proba((X - X.mean(0)) / X.std(0))[:, 1])


def test_saved_attackers_are_plain_json_and_predict_the_same(tmp_path):
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(50, 4)), rng.random(50) < 0.5
    X[3, 1] = np.nan
    a = Attacker("encodermi", "learned", 1, fit_logistic(X, y), {"images": 50})
    save([a], OutputLayout(tmp_path))
    doc = json.loads((tmp_path / "attackers" / "encodermi_learned.json").read_text())  # readable without clipaudit
    z = (np.where(np.isnan(X), doc["model"]["impute"], X) - doc["model"]["mean"]) / doc["model"]["std"]
    by_hand = 1 / (1 + np.exp(-(z @ doc["model"]["coef"] + doc["model"]["intercept"])))
    (back,) = load(tmp_path / "attackers")
    assert np.allclose(back.model.predict_proba(X), by_hand) and back.name == "encodermi_learned"
    (tmp_path / "attackers" / "encodermi_learned.json").write_text('{"format": 99}')
    with pytest.raises(AttackerError, match="format 99"):
        load(tmp_path / "attackers")


def test_pseudo_members_are_the_candidates_above_the_controls():
    rng = np.random.default_rng(0)
    score = np.concatenate([rng.normal(0, 1, 40), rng.normal(3, 1, 40), [np.nan]])
    is_control = np.arange(81) < 40
    groups = np.arange(81) % 7
    y = pseudo_labels(score, is_control, groups)
    assert (y[:40] == 0).all() and y[80] == -1  # every control a non-member; a missing score left out
    cut = np.quantile(score[:40], PSEUDO_QUANTILE)
    assert np.array_equal(y[40:80] == 1, score[40:80] > cut) and (y[40:80] == 1).sum() >= 30
    # nothing above the controls (or too few controls): no weak labels, so no attacker is fitted
    assert pseudo_labels(np.concatenate([score[:40], score[:40] - 5, [0.0]]), is_control, groups) is None
    assert pseudo_labels(score, np.arange(81) < MIN_WEAK - 1, groups) is None


@pytest.mark.slow
def test_every_candidate_gets_learned_scores_and_another_audit_applies_them(canary_lab, tmp_path, capsys):
    """Fit on the labelled audit of the trained model; apply to the audit of the untrained one
    (the shadow workflow: fit where membership is known, apply where it is not)."""
    import yaml

    from clipaudit.cli import main

    def job(src, out, labels=True):
        raw = yaml.safe_load(src.read_text())
        raw.update(output=str(out), attacks={"mim": {}, "encodermi": {"views": 4}},
                   compute={"executor": "local", "batch_size": 32})
        if not labels:
            raw.pop("labels")
        path = src.with_name(f"job-attackers-{out.name}.yaml")
        path.write_text(yaml.safe_dump(raw))
        return path

    fit_on, apply_to = tmp_path / "fit", tmp_path / "apply"
    assert main(["run", str(job(canary_lab.job, fit_on)), "--no-progress"]) == 0
    assert main(["run", str(job(canary_lab.job_untrained, apply_to, labels=False)), "--no-progress"]) == 0
    names = {"encodermi_learned", "encodermi_learned_mlp", "encodermi_learned_set", "mim_learned"}
    assert {p.stem for p in (fit_on / "attackers").glob("*.json")} == names
    assert not (apply_to / "attackers").exists() and not (apply_to / "sample_scores").exists()

    ok = sum(r["status"] == "ok" for r in pq.read_table(fit_on / "samples", columns=["status"]).to_pylist())
    rows = pq.read_table(fit_on / "sample_scores").to_pylist()
    assert len(rows) == ok and all(r[f"{n}_score"] is not None for r in rows for n in names)

    capsys.readouterr()
    assert main(["reduce", str(apply_to), "--attackers", str(fit_on)]) == 0
    applied = pq.read_table(apply_to / "sample_scores").to_pylist()
    assert len(applied) == ok and all(r["mim_learned_score"] is not None for r in applied)
    # the applied scores are the saved model on this audit's own features, computed by hand
    doc = json.loads((fit_on / "attackers" / "mim_learned.json").read_text())["model"]
    feats = {(r["shard"], r["position"]): r["mim_features"]
             for r in pq.read_table(apply_to / "samples", columns=["shard", "position", "mim_features"]).to_pylist()}
    X = np.array([feats[(r["shard"], r["position"])] for r in applied], dtype=float)
    z = (X - doc["mean"]) / doc["std"] @ doc["coef"] + doc["intercept"]
    assert np.allclose([r["mim_learned_score"] for r in applied], 1 / (1 + np.exp(-z)))
    assert main(["reduce", str(apply_to), "--attackers", str(tmp_path)]) == 2  # no attackers/ there

    # without labels, controls alone: attackers fitted weakly (controls vs pseudo-members), every ok sample scored
    labelled = (canary_lab.job.parent / "data" / "labels.csv").read_text().splitlines()[1:]
    controls = tmp_path / "controls.csv"
    controls.write_text("identity\n" + "".join(f"{r.split(',')[0]}\n" for r in labelled if r.endswith(",false")))
    weak_dir = tmp_path / "weak"
    shutil.copytree(fit_on, weak_dir)
    shutil.rmtree(weak_dir / "attackers")
    assert main(["reduce", str(weak_dir), "--controls", str(controls), "--no-labels"]) == 0
    fitted = {p.stem: json.loads(p.read_text()) for p in (weak_dir / "attackers").glob("*.json")}
    assert not (weak_dir / "metrics.json").exists()
    assert fitted and all(d["fitted_on"]["weak"] == 1 and d["fitted_on"]["members"] >= MIN_WEAK
                          for d in fitted.values())
    # pseudo-members picked by the other attack's score, classes balanced, contamination bounded
    assert {n: d["fitted_on"]["pseudo_members_from"] for n, d in fitted.items()} == {
        n: ("encodermi" if n.startswith("mim") else "mim") for n in fitted}
    assert all(d["fitted_on"]["members"] == d["fitted_on"]["nonmembers"] and
               0 <= d["fitted_on"]["expected_contamination"] <= 1 for d in fitted.values())
    weak_rows = pq.read_table(weak_dir / "sample_scores").to_pylist()
    assert len(weak_rows) == ok and all(r[f"{n}_score"] is not None for r in weak_rows for n in fitted)


def _synthetic(tmp_path, rows=2000, labelled=12):
    """A synthetic audit folder (bench/reduce_scale.py's, ~100 images per identity in parts of 300
    rows) and Labels for ``labelled`` identities."""
    from clipaudit.bench.reduce_scale import _identity_names, synthetic_audit
    from clipaudit.io.outputs import OutputLayout
    from clipaudit.data.labels import Labels

    synthetic_audit(tmp_path, rows, seed=1, rows_per_part=300)
    members = pq.read_table(tmp_path / "samples", columns=["identity", "encodermi_score"]).group_by("identity") \
        .aggregate([("encodermi_score", "mean")]).sort_by("identity").to_pylist()
    cut = np.median([m["encodermi_score_mean"] for m in members])
    labels = Labels(identities={m["identity"]: m["encodermi_score_mean"] > cut
                                for m in members if m["identity"] in set(_identity_names(labelled))})
    return OutputLayout(tmp_path), labels


def _all_scores(layout, learned):
    from clipaudit.reduce.attackers import ok_rows

    out = {}
    for part in sorted(layout.samples_dir.glob("*.parquet")):
        t = ok_rows(part, learned.columns, layout.store)
        for name, s in learned.scores(part.name, t).items():
            out.setdefault(name, []).append(s)
    return {n: np.concatenate(v) for n, v in out.items()}


def _params():
    from clipaudit.contract.registry import get

    return get("encodermi").params()


def test_streamed_scores_equal_one_fit_on_all_rows_in_memory(tmp_path):
    """Below the cap, fitting part by part gives exactly the scores of fit_and_score on every
    ok row read at once (out-of-fold for the labelled, the full model for the rest)."""
    from clipaudit.reduce.attackers import image_labels, score_candidates
    from clipaudit.reduce.evaluation import feature_matrix

    layout, labels = _synthetic(tmp_path)
    learned = score_candidates(layout, {"encodermi": _params()}, labels, seed=3)
    assert set(learned.names) == {"encodermi_learned", "encodermi_learned_mlp", "encodermi_learned_set"}
    got = _all_scores(layout, learned)
    t = pq.read_table(layout.samples_dir, columns=["shard", "key", "identity", "status", "encodermi_features"])
    t = t.filter(np.array(t.column("status").to_pylist()) == "ok")
    ids = t.column("identity").to_pylist()
    first = {}
    groups = np.array([first.setdefault(i, len(first)) for i in ids])
    y = image_labels(ids, t.column("shard").to_pylist(), t.column("key").to_pylist(), labels)
    from clipaudit.contract.registry import get

    for variant in get("encodermi").learned:
        X = variant.prepare(feature_matrix(t.column("encodermi_features")))
        expect, _ = fit_and_score(X, y, groups, 3, variant.model)
        np.testing.assert_allclose(got[f"encodermi_{variant.name}"], expect, rtol=1e-9, atol=1e-12)
    fitted = {a.name: a.fitted_on for a in learned.fitted}
    assert fitted["encodermi_learned"]["images"] == int((y >= 0).sum()) and "pool" not in fitted["encodermi_learned"]


def test_above_the_cap_the_fit_set_is_a_seeded_sample_and_every_row_is_scored(tmp_path):
    from clipaudit.reduce.attackers import score_candidates

    layout, labels = _synthetic(tmp_path, labelled=16)
    a = score_candidates(layout, {"encodermi": _params()}, labels, seed=0, max_fit=200)
    b = score_candidates(layout, {"encodermi": _params()}, labels, seed=0, max_fit=200)
    c = score_candidates(layout, {"encodermi": _params()}, labels, seed=1, max_fit=200)
    on = {x.name: x.fitted_on for x in a.fitted}["encodermi_learned"]
    assert on["images"] == 200 and on["pool"] > 1500  # 16 identities × ~100 images, errors excluded
    sa, sb, sc = _all_scores(layout, a), _all_scores(layout, b), _all_scores(layout, c)
    n_ok = pq.read_table(layout.samples_dir, columns=["status"]).column("status").to_pylist().count("ok")
    for name in a.names:
        assert len(sa[name]) == n_ok and not np.isnan(sa[name]).any()
        np.testing.assert_array_equal(sa[name], sb[name])  # the same seed draws the same sample
    assert not np.array_equal(sa["encodermi_learned"], sc["encodermi_learned"])
    oof_rows = sum(len(r) for r, _ in a.variants["encodermi_learned"].oof.values())
    assert oof_rows == 200


def test_weak_supervision_never_takes_an_attacks_pseudo_members_from_its_own_score():
    from clipaudit.reduce.attackers import balanced, expected_contamination, pseudo_source

    assert pseudo_source("encodermi", ["encodermi", "mim", "caption"]) == "caption"
    assert pseudo_source("encodermi", ["encodermi", "mim"]) == "mim"
    assert pseudo_source("mim", ["encodermi", "mim"]) == "encodermi"
    assert pseudo_source("mim", ["mim"]) is None  # nothing independent: no weakly supervised attacker
    y = np.array([0] * 30 + [1] * 8 + [-1] * 5, dtype=np.int8)
    b = balanced(y, seed=1)
    assert (b == 1).sum() == (b == 0).sum() == 8 and (b[30:38] == 1).all() and (b[38:] == -1).all()
    assert np.array_equal(b, balanced(y, seed=1)) and not np.array_equal(b, balanced(y, seed=2))
    # 1,000 candidates, 10 % of non-members land above the controls' 90th percentile: at most 100 of 400
    assert expected_contamination(400, 1000) == pytest.approx(0.25) and expected_contamination(50, 1000) == 1.0
