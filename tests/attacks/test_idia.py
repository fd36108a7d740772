"""IDIA: per-image ranks (map side) and the plurality vote per template (reduce side)."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clipaudit.attacks.base import MapBatch
from clipaudit.attacks.idia import IdiaAttack, load_name_pool
from clipaudit.data.samples import Sample
from clipaudit.io.schemas import load_schema
from clipaudit.io.outputs import OutputLayout, PartWriter
from clipaudit.reduce import ReduceOptions, identities_table


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
    return {"identity": identity, "idia_top1": list(top1), "idia_true_rank": [1 if t == identity else None for t in top1],
            "status": status}


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
    attack.bind(np.stack([t0, t1]).astype(np.float16), SimpleNamespace(device=torch.device("cpu")), "faiss")
    emb = torch.tensor([[1.0, 0.5, 0, 0], [0, 0, 0.2, 1.0]])
    samples = [Sample("s", "k0", 0, identity="Ann"), Sample("s", "k1", 1, identity="Cy")]
    batch = lambda: MapBatch(samples, None, emb, None, 0, 8)  # noqa: E731
    out = attack.compute(batch())
    assert out["idia_top1"] == [["Ann", "Bob"], ["Dee", "Dee"]]
    assert out["idia_true_rank"] == [[1, 2], [2, 2]]
    samples[1].identity = "Not In Pool"
    assert attack.compute(batch())["idia_true_rank"][1] == [None, None]


def test_identity_pvalues_against_nonmember_controls(tmp_path):
    from clipaudit.reduce.labels import Labels

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
