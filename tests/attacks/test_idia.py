"""IDIA: per-image ranks (map side) and the plurality vote per template (reduce side)."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clipaudit.attacks.base import MapBatch
from clipaudit.attacks.idia import IdiaAttack, load_name_pool
from clipaudit.data.samples import Sample
from clipaudit.contract.schemas import load_schema
from clipaudit.io.outputs import OutputLayout, PartWriter
from clipaudit.reduce import identities_table
from clipaudit.reduce.options import ReduceOptions


def write_samples(root: Path, rows: list[dict]) -> OutputLayout:
    layout = OutputLayout(root)
    layout.make_dirs()
    cols = {f.name: [r.get(f.name) for r in rows] for f in load_schema("samples")}
    cols["shard"] = ["s.tar"] * len(rows)
    cols["position"] = list(range(len(rows)))
    cols["key"] = [str(i) for i in range(len(rows))]
    cols["status"] = [r.get("status", "ok") for r in rows]
    w = PartWriter(layout.sample_part("s.tar"), load_schema("samples"))
    w.write(cols)
    w.commit()
    return layout


def scores(tmp_path, rows, tau=1, names=None):
    opts = ReduceOptions(attacks={"idia": {"tau": tau}}, names=names)
    t = identities_table(write_samples(tmp_path, rows), opts).to_pylist()
    return {r["identity"]: r for r in t}


def img(identity, *top1, status="ok"):
    return {"identity": identity, "idia_top1": list(top1),
            "idia_true_rank": [1 if t == identity else None for t in top1], "status": status}


def test_plurality_vote_counts_templates(tmp_path):
    rows = [img("Ann", "Ann", "Bob", "Ann"), img("Ann", "Ann", "Bob", "Cy"), img("Ann", "Bob", "Bob", "Dee")]
    r = scores(tmp_path, rows)["Ann"]
    # template 0: Ann 2 vs Bob 1 → vote; template 1: Bob wins; template 2: Ann 1, Cy 1, Dee 1 → tie, no vote
    assert r["idia_score"] == 1 and r["idia_member"] is True
    assert r["n_images"] == 3
    assert r["idia_top1_rate"] == pytest.approx(3 / 9)


def test_tie_is_no_vote(tmp_path):
    rows = [img("Ann", "Ann", "Ann"), img("Ann", "Bob", "Ann")]
    assert scores(tmp_path, rows)["Ann"]["idia_score"] == 1  # template 0 ties 1:1


def test_tau_threshold(tmp_path):
    rows = [img("Ann", "Ann", "Ann", "Bob")] * 3
    assert scores(tmp_path, rows, tau=2)["Ann"]["idia_member"] is True
    assert scores(tmp_path / "b", rows, tau=3)["Ann"]["idia_member"] is False


def test_error_rows_do_not_vote_and_are_counted(tmp_path):
    rows = [img("Ann", "Ann"), img("Ann", "Bob", status="error"), img("Ann", "Bob", status="error")]
    r = scores(tmp_path, rows)["Ann"]
    assert r["idia_score"] == 1 and r["n_images"] == 1 and r["n_errors"] == 2


def test_identity_with_only_errors_has_no_score(tmp_path):
    r = scores(tmp_path, [img("Ann", "Ann"), {"identity": "Zed", "status": "error"}])["Zed"]
    assert r["n_images"] == 0 and r["idia_score"] is None and r["idia_member"] is None


def test_name_absent_from_pool_never_votes(tmp_path):
    pool = tmp_path / "names.txt"
    pool.write_text("Ann\nBob\n")
    rows = [img("Ann", "Ann"), img("Eve", "Bob"), img("Eve", "Bob")]
    t = scores(tmp_path, rows, names=pool)
    assert t["Eve"]["in_name_pool"] is False and t["Eve"]["idia_score"] == 0
    assert t["Ann"]["in_name_pool"] is True


def test_name_pool_normalises_and_dedupes(tmp_path):
    p = tmp_path / "n.txt"
    p.write_text("  Ann   Lee \n\nBob\nAnn Lee\n")
    assert load_name_pool(p) == ["Ann Lee", "Bob"]


def test_map_side_ranks_and_top1():
    names = ["Ann", "Bob", "Cy", "Dee"]
    # 2 templates × 4 names in 4 dims: name i's embedding is axis i (template 1 swaps Ann/Bob)
    t0 = np.eye(4, dtype=np.float32)
    t1 = t0[[1, 0, 2, 3]]
    attack = IdiaAttack(names, ["a {}", "b {}"], top_k=2)
    attack.bind([np.stack([t0, t1]).astype(np.float16)], SimpleNamespace(device=torch.device("cpu")), "faiss")
    emb = torch.tensor([[1.0, 0.5, 0, 0], [0, 0, 0.2, 1.0]])
    samples = [Sample("s", "k0", 0, identity="Ann"), Sample("s", "k1", 1, identity="Cy")]
    batch = lambda: MapBatch(samples, None, emb, None, 0, 8)  # noqa: E731
    out = attack.compute(batch())
    assert out["idia_top1"] == [["Ann", "Bob"], ["Dee", "Dee"]]
    assert out["idia_true_rank"] == [[1, 2], [2, 2]]
    samples[1].identity = "Not In Pool"
    assert attack.compute(batch())["idia_true_rank"][1] == [None, None]


def test_identity_pvalues_against_nonmember_controls(tmp_path):
    from clipaudit.data.labels import Labels

    rows = [img("A", *["A"] * 3), img("B", "B", "B", "x"), img("C", "x", "x", "x"), img("D", "D", "x", "x"),
            img("E", "x", "x", "x")]
    labels = Labels({"A": True, "B": True, "C": False, "D": False, "E": False})
    t = identities_table(write_samples(tmp_path, rows), ReduceOptions(attacks=("idia",)), labels).to_pylist()
    p = {r["identity"]: r["idia_pvalue"] for r in t}
    # controls C, D, E score 0, 1, 0. A scores 3: no control reaches it → p = 1/4
    assert p["A"] == pytest.approx(1 / 4) and p["B"] == pytest.approx(1 / 4)  # B scores 2
    # leave-one-out for controls: D (1) against C, E (0, 0) → (1 + 0)/(1 + 2)
    assert p["D"] == pytest.approx(1 / 3)
    assert p["C"] == pytest.approx(1.0)  # 0 against {1, 0}: both ≥ 0 → (1 + 2)/(1 + 2)


def test_identity_vote_matches_a_direct_count(tmp_path):
    """identities.parquet's idia_score equals a plain count per template (Counter), ties
    included: the true name must be strictly the most frequent."""
    from collections import Counter

    rng = np.random.default_rng(5)
    vocab = ["A", "B", "C", "x", "y"]
    rows = [img(who, *[str(rng.choice(vocab)) for _ in range(6)]) for who in ("A", "B", "C") for _ in range(7)]
    got = scores(tmp_path, rows, tau=2)
    for who in ("A", "B", "C"):
        mine = [r["idia_top1"] for r in rows if r["identity"] == who]
        expect = 0
        for t in range(6):
            c = Counter(m[t] for m in mine)
            others = max((v for n, v in c.items() if n != who), default=0)
            expect += c.get(who, 0) > others
        assert got[who]["idia_score"] == expect and got[who]["idia_member"] == (expect >= 2)


def test_plurality_ties_are_no_vote_and_draws_are_seeded():
    from clipaudit.attacks.idia import plurality_scores

    tie = np.array([[0], [1]])
    assert plurality_scores(tie, 0, k=2, draws=3, seed=0).tolist() == [0, 0, 0]
    assert plurality_scores(np.array([[0], [0], [1]]), 0, k=3, draws=2, seed=0).tolist() == [1, 1]
    x = np.random.default_rng(0).integers(0, 4, (12, 21))
    a, b = plurality_scores(x, 1, 3, 20, seed=7), plurality_scores(x, 1, 3, 20, seed=7)
    assert a.tolist() == b.tolist() and plurality_scores(x, 1, 3, 20, seed=8).tolist() != a.tolist()


@pytest.mark.slow
def test_sweep_rises_with_k_on_the_trained_model_and_stays_flat_untrained(canary_lab, tmp_path):
    import json

    import pyarrow.parquet as pq

    from clipaudit.app.runner import run_job
    from clipaudit.app.jobs import load_job

    def sweep(job, out):
        spec = load_job(job)
        spec = spec.model_copy(update={"output": tmp_path / out, "attacks": type(spec.attacks)(idia=spec.attacks.idia),
                                       "compute": spec.compute.model_copy(update={"executor": "local"})})
        run_job(spec, progress=False)
        m = json.loads((tmp_path / out / "metrics.json").read_text())["idia"]
        ident = pq.read_table(tmp_path / out / "identities.parquet").to_pylist()
        return m, ident

    trained, ident = sweep(canary_lab.job, "trained")
    untrained, _ = sweep(canary_lab.job_untrained, "untrained")
    ks = [e["k"] for e in trained["sweep"]]
    assert ks == [1, 3, 5]  # the lab's job stops at 5: its non-members have 6 images
    by_k = {e["k"]: e for e in trained["sweep"]}
    # the labelled identities whose names the pool lacks are left out of IDIA (missing_names: exclude)
    labelled = len(canary_lab.members) + len(canary_lab.nonmembers) - len(canary_lab.not_in_pool)
    assert all(e["n_members"] + e["n_nonmembers"] == labelled and e["n_short"] == 0 for e in trained["sweep"])
    assert trained["n_short"] == 0 and trained["auc_draw_std"] >= 0
    tpr = [by_k[k]["tpr"] for k in (1, 3, 5)]
    assert tpr == sorted(tpr) and tpr[-1] >= 0.9, trained["sweep"]
    assert all(by_k[k]["fpr"] <= 0.2 for k in (1, 3, 5))
    assert trained["k"] == 5 and trained["auc"] >= 0.95  # the headline compares everybody at 5 images
    assert all(e["tpr"] <= 0.35 and e["fpr"] <= 0.35 for e in untrained["sweep"] if e["n_members"])
    assert all((r["idia_score_at_k"] is None) == (r["identity"] in canary_lab.not_in_pool)
               for r in ident if r["n_images"] >= 5)


def test_streamed_identities_match_one_batch_and_a_direct_count(tmp_path, monkeypatch):
    """The sweep streams identities out of DuckDB in batches; an identity cut by a batch
    boundary (batches of 3 rows here) gives the same scores as one batch, and both equal
    plurality_scores on ids from one global vocabulary."""
    import clipaudit.attacks.idia as idia
    from clipaudit.contract.registry import AnalysisInput
    from clipaudit.reduce.tables import connect

    rng = np.random.default_rng(3)
    vocab = ["Ann", "Bob", "Cy", "Dee", "Eve", "x", "y"]
    rows = []
    for who, n, p in (("Ann", 7, 0.7), ("Bob", 5, 0.2), ("Cy", 1, 0.9), ("Dee", 8, 0.5), ("Eve", 4, 0.6)):
        for _ in range(n):
            rows.append(img(who, *[who if rng.random() < p else str(rng.choice(vocab)) for _ in range(5)]))
    layout = write_samples(tmp_path, rows)
    params = idia.IdiaParams(k=[1, 2, 4], draws=6)
    labels = {"Ann": True, "Bob": False, "Dee": True, "Eve": False}

    def run(stream_rows):
        monkeypatch.setattr(idia, "STREAM_ROWS", stream_rows)
        con = connect(layout)
        try:
            return idia.analyse(AnalysisInput(con, params, 11, labels))
        finally:
            con.close()

    whole, cut = run(1000), run(3)
    assert cut.metrics == whole.metrics and cut.columns == whole.columns
    ids = {n: i for i, n in enumerate(vocab)}
    for who in ("Ann", "Dee"):
        mine = np.array([[ids[n] for n in r["idia_top1"]] for r in rows if r["identity"] == who])
        k = whole.metrics["k"]
        expect = idia.plurality_scores(mine, ids[who], k, params.draws, idia._stable_seed(11, who, k)).mean()
        assert whole.columns["idia_score_at_k"][who] == pytest.approx(expect)
    sweep = {e["k"]: e for e in whole.metrics["sweep"]}
    assert sweep[4]["n_members"] == 2 and sweep[4]["n_nonmembers"] == 2  # Bob (5) and Eve (4) reach k = 4


def test_template_average_is_the_normalised_mean_and_needs_tau_1():
    from pydantic import ValidationError

    from clipaudit.attacks.idia import IdiaAttack, IdiaParams

    rng = np.random.default_rng(0)
    per_template = {t: rng.normal(size=(3, 8)).astype(np.float32) for t in ("a {}", "b {}")}
    for v in per_template.values():
        v /= np.linalg.norm(v, axis=1, keepdims=True)

    class Model:
        def encode_texts(self, texts):
            return torch.from_numpy(per_template[texts[0].split()[0] + " {}"])

    state = IdiaAttack(["x", "y", "z"], ["a {}", "b {}"], 2, average=True).state_slice(Model(), 0, 3)
    mean = (per_template["a {}"].astype(np.float16).astype(np.float32)
            + per_template["b {}"].astype(np.float16).astype(np.float32)) / 2
    assert state.shape == (1, 3, 8)
    np.testing.assert_allclose(state[0], mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=2e-3)
    assert IdiaAttack(["x", "y", "z"], ["a {}", "b {}"], 2).state_slice(Model(), 0, 3).shape == (2, 3, 8)
    with pytest.raises(ValidationError, match="tau must be 1"):
        IdiaParams(template_average=True, tau=2)


def test_template_average_ranks_each_image_once_and_separates_the_canary(canary_lab, tmp_path):
    import json

    import pyarrow.parquet as pq

    from clipaudit.app.runner import run_job
    from clipaudit.app.jobs import load_job

    spec = load_job(canary_lab.job)
    idia = spec.attacks.idia.model_copy(update={"template_average": True})
    spec = spec.model_copy(update={"output": tmp_path / "avg", "attacks": type(spec.attacks)(idia=idia),
                                   "compute": spec.compute.model_copy(update={"executor": "local"})})
    run_job(spec, progress=False)
    rows = pq.read_table(tmp_path / "avg" / "samples", columns=["status", "idia_top1"]).to_pylist()
    assert {len(r["idia_top1"]) for r in rows if r["status"] == "ok"} == {1}
    m = json.loads((tmp_path / "avg" / "metrics.json").read_text())["idia"]
    assert m["auc"] >= 0.9, m


def test_a_sweep_entrys_auc_is_the_mean_over_draws_of_each_draws_auc():
    """Each draw is one random set of k images per identity; the AUC is computed per draw and
    averaged (IDIA's protocol), never on scores pooled across draws (which is optimistic)."""
    from sklearn.metrics import roc_auc_score

    from clipaudit.attacks.idia import _sweep_entry

    rng = np.random.default_rng(3)
    names = [f"M{i}" for i in range(6)] + [f"N{i}" for i in range(6)] + ["short"]
    labels = {n: n.startswith("M") for n in names[:-1]} | {"short": True}
    scores = np.vstack([rng.integers(0, 3, size=(6, 20)) + 1, rng.integers(0, 3, size=(6, 20)),
                        np.full((1, 20), np.nan)]).astype(float)  # the last identity has fewer than k images
    entry = _sweep_entry(3, scores, names, labels, tau=2, draws=20)
    y = np.array([labels[n] for n in names[:-1]])
    per_draw = [roc_auc_score(y, scores[:-1, d]) for d in range(20)]
    assert entry["auc"] == pytest.approx(np.mean(per_draw)) and entry["auc_std"] == pytest.approx(np.std(per_draw))
    pooled = roc_auc_score(y, scores[:-1].mean(1))
    assert abs(pooled - entry["auc"]) > 0.01  # the two estimators differ here: the test can tell them apart
    assert (entry["n_members"], entry["n_nonmembers"], entry["n_short"]) == (6, 6, 1)


def test_the_headline_at_k_is_the_mean_over_draws_of_each_draws_metrics(tmp_path):
    """The headline AUC and TPR at k are computed on one draw of k images per identity and
    averaged over draws (recomputed here from the votes with scikit-learn), not on the
    identity's mean over draws; identities below k are counted (n_short), not silently lost."""
    import json

    from sklearn.metrics import roc_auc_score

    import clipaudit.attacks.idia as idia
    from clipaudit.reduce import reduce_outputs

    rng = np.random.default_rng(5)
    vocab = [f"P{i}" for i in range(16)]
    rows, truth = [], {}
    for i, who in enumerate(vocab):
        member, n = i < 8, (3 if i in (0, 8) else 8)  # P0 and P8 have fewer than k = 4 images
        truth[who] = member
        for _ in range(n):
            rows.append(img(who, *[who if rng.random() < (0.45 if member else 0.3) else str(rng.choice(vocab))
                                   for _ in range(4)]))
    layout = write_samples(tmp_path, rows)
    labels = tmp_path / "labels.csv"
    labels.write_text("identity,member\n" + "".join(f"{n},{int(m)}\n" for n, m in truth.items()))
    opts = ReduceOptions(attacks={"idia": {"k": [1, 4], "headline_k": 4, "draws": 7}}, labels=labels, seed=3)
    reduce_outputs(layout, opts)
    m = json.loads(layout.metrics.read_text())["idia"]
    ids = {n: i for i, n in enumerate(vocab)}
    kept = [n for n in vocab if n not in ("P0", "P8")]
    per = np.array([idia.plurality_scores(np.array([[ids[t] for t in r["idia_top1"]] for r in rows
                                                    if r["identity"] == n]), ids[n], 4, 7, idia._stable_seed(3, n, 4))
                    for n in kept], dtype=float)
    y = np.array([truth[n] for n in kept])
    aucs = [roc_auc_score(y, per[:, d]) for d in range(7)]
    assert m["k"] == 4 and m["draws"] == 7 and m["n_short"] == 2
    assert m["auc"] == pytest.approx(np.mean(aucs)) and m["auc_draw_std"] == pytest.approx(np.std(aucs))
    assert abs(roc_auc_score(y, per.mean(1)) - m["auc"]) > 0.005  # pooling over draws would differ
    assert (m["n_members"], m["n_nonmembers"]) == (7, 7)


def test_the_sweep_keeps_one_population_across_k_unless_asked_per_k(tmp_path):
    from clipaudit.contract.registry import AnalysisInput
    from clipaudit.reduce.tables import connect
    import clipaudit.attacks.idia as idia

    rows = []
    for who, n in (("Ann", 6), ("Bob", 2), ("Cy", 6), ("Dee", 2)):
        rows += [img(who, who, "x") for _ in range(n)]
    layout = write_samples(tmp_path, rows)
    labels = {"Ann": True, "Bob": True, "Cy": False, "Dee": False}
    con = connect(layout)
    try:
        fixed = idia.analyse(AnalysisInput(con, idia.IdiaParams(k=[1, 5], draws=3), 0, labels)).metrics
        per_k = idia.analyse(AnalysisInput(con, idia.IdiaParams(k=[1, 5], draws=3, population="per_k"), 0,
                                           labels)).metrics
    finally:
        con.close()
    assert [(e["k"], e["n_members"], e["n_nonmembers"]) for e in fixed["sweep"]] == [(1, 1, 1), (5, 1, 1)]
    assert [(e["k"], e["n_members"], e["n_nonmembers"]) for e in per_k["sweep"]] == [(1, 2, 2), (5, 1, 1)]
    assert fixed["population"].startswith("fixed") and per_k["population"].startswith("per_k")


def test_the_mean_reciprocal_rank_does_not_depend_on_the_order_of_the_rows():
    """A float sum depends on the order of its terms, and DuckDB aggregates in parallel, so one
    audit could give values a few ulps apart from run to run. The reciprocal ranks are summed
    exactly (as decimals), so every order of the same rows gives the same bits."""
    import duckdb
    import pyarrow as pa

    from clipaudit.attacks.idia import IdiaParams, identity_scores_sql

    rng = np.random.default_rng(0)
    ranks = [[int(r) if r < 900 else None for r in rng.integers(1, 1000, 7)] for _ in range(2000)]
    expected = np.mean([0.0 if r is None else 1.0 / r for row in ranks for r in row])
    found = set()
    for order in (range(len(ranks)), reversed(range(len(ranks))), rng.permutation(len(ranks))):
        rows = [ranks[i] for i in order]
        con = duckdb.connect()
        con.execute("SET threads = 1")  # the rows are summed in the order given
        con.register("s", pa.table({"identity": ["Ann"] * len(rows), "idia_true_rank": rows}))
        value = con.sql(identity_scores_sql("s", IdiaParams())).fetchall()[0][2]
        assert value == pytest.approx(expected, rel=1e-12)
        found.add(value)
    assert len(found) == 1, found
