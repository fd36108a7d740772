"""The candidate-embedding index: planted copies are found and stop voting, different photos
of one person never merge; every candidate is looked up in a reference index."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import sample_files, write_tar
from PIL import Image

from clipaudit.cli import main
from clipaudit.lab.identities import make_identities, render


def _jpeg(img: np.ndarray, quality: int = 90, scale: float = 1.0) -> bytes:
    im = Image.fromarray(img)
    if scale != 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def planted(canary_lab, tmp_path_factory):
    """An audit of the trained lab model over 12 people × 4 different photos, plus 2 copies
    (re-encoded at quality 60, and shrunk to 0.7×) of the first photo of 6 of them."""
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    members, copies = [], []
    for p, person in enumerate(make_identities(12, seed=11)):
        photos = [render(person, rng, 96) for _ in range(4)]
        for i, img in enumerate(photos):
            members += sample_files(f"p{p:02d}_{i}", person.name, _jpeg(img))
        if p < 6:
            for c, (q, sc) in enumerate(((60, 1.0), (85, 0.7))):
                members += sample_files(f"p{p:02d}_copy{c}", person.name, _jpeg(photos[0], q, sc))
                copies.append((f"p{p:02d}_copy{c}", f"p{p:02d}_0"))
    write_tar(root / "a.tar", members)
    (root / "names.txt").write_text("".join(f"{p.name}\n" for p in make_identities(12, seed=11)) + "Zed Nobody\n")
    (root / "job.yaml").write_text(f"""
model: {{name: {canary_lab.model_config}, pretrained: {canary_lab.trained}, precision: fp32}}
data: {{shards: a.tar}}
names: names.txt
attacks: {{idia: {{}}, mim: {{mask_ratios: [0.5]}}}}
compute: {{executor: local, batch_size: 16, decode_threads: 1}}
output: out
""")
    assert main(["run", str(root / "job.yaml"), "--no-progress"]) == 0
    return root, dict(copies)


def test_planted_copies_are_found_and_no_two_photos_of_a_person_merge(planted):
    root, copies = planted
    before = {r["identity"]: r for r in pq.read_table(root / "out" / "identities.parquet").to_pylist()}
    assert main(["reduce", str(root / "out"), "--near-duplicates"]) == 0
    found = pq.read_table(root / "out" / "near_duplicates.parquet").to_pylist()
    assert {r["key"]: r["near_duplicate_of_key"] for r in found} == copies  # exactly the planted ones
    assert all(r["cosine"] >= 0.95 and r["hash_bits"] <= 6 for r in found)
    after = {r["identity"]: r for r in pq.read_table(root / "out" / "identities.parquet").to_pylist()}
    # copies no longer count as images of their identity: 6 people had 6 images, now 4 like the rest
    assert sorted(r["n_images"] for r in before.values()) == [4] * 6 + [6] * 6
    assert sum(r["n_images"] for r in before.values()) - sum(r["n_images"] for r in after.values()) == len(copies)
    assert sorted(r["n_images"] for r in after.values()) == [4] * 12
    # off again: the file goes, every image counts
    assert main(["reduce", str(root / "out")]) == 0
    assert not (root / "out" / "near_duplicates.parquet").exists()
    assert sum(r["n_images"] for r in pq.read_table(root / "out" / "identities.parquet").to_pylist()) == 12 * 4 + 12


def test_identity_partitions_give_the_same_copies_as_one(planted, tmp_path, monkeypatch):
    """The search runs per partition of identities (memory bounded by a partition): 12 people
    in partitions of ~5 images find the same copies, every column equal, as one partition."""
    import clipaudit.reduce.neighbours as nb
    from clipaudit.io.outputs import OutputLayout

    root, _ = planted
    layout = OutputLayout(root / "out")
    whole = nb.near_duplicates(layout, tmp_path / "whole.parquet")
    parts_seen = []
    real = nb._copies_in_bucket
    monkeypatch.setattr(nb, "_copies_in_bucket", lambda t, *a: parts_seen.append(t.num_rows) or real(t, *a))
    monkeypatch.setattr(nb, "ROWS_PER_BUCKET", 5)
    cut = nb.near_duplicates(layout, tmp_path / "cut.parquet")
    assert len(parts_seen) > 3 and whole == cut == 12
    assert pq.read_table(tmp_path / "cut.parquet").equals(pq.read_table(tmp_path / "whole.parquet"))
    # hash searches over blocks of whole identities (here one or two people each): the same copies
    monkeypatch.setattr(nb, "ROWS_PER_BUCKET", 100_000)
    monkeypatch.setattr(nb, "ROWS_PER_SEARCH", 7)
    assert nb.near_duplicates(layout, tmp_path / "blocks.parquet") == 12
    assert pq.read_table(tmp_path / "blocks.parquet").equals(pq.read_table(tmp_path / "whole.parquet"))
    assert not list(layout.tmp_dir.glob("near-duplicates-*"))  # the partitions are removed


def test_every_candidate_is_looked_up_in_a_reference_index(planted, tmp_path, capsys):
    import faiss

    root, _ = planted
    emb = pq.read_table(root / "out" / "embeddings").sort_by([("position", "ascending")])
    X = np.asarray(emb.column("embedding").to_pylist(), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(X[::2])  # a "training set" holding every second candidate
    faiss.write_index(index, str(tmp_path / "ref.faiss"))
    assert main(["reduce", str(root / "out"), "--reference", str(tmp_path / "ref.faiss")]) == 0
    rows = pq.read_table(root / "out" / "reference_matches.parquet").sort_by([("position", "ascending")]).to_pylist()
    assert len(rows) == len(X)
    held = rows[::2]
    assert all(r["reference_similarity"] > 0.999 for r in held)
    assert [r["reference_id"] for r in held] == list(range(len(held)))
    assert all(r["reference_similarity"] <= 1.0001 for r in rows)

    bad = faiss.IndexFlatIP(X.shape[1] + 1)
    bad.add(np.ones((1, X.shape[1] + 1), dtype=np.float32))
    faiss.write_index(bad, str(tmp_path / "bad.faiss"))
    capsys.readouterr()
    assert main(["reduce", str(root / "out"), "--reference", str(tmp_path / "bad.faiss")]) == 2
    assert "another model?" in capsys.readouterr().err
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    assert main(["reduce", str(root / "out"), "--reference", str(tmp_path / "junk.faiss")]) == 2
    assert "is not a FAISS index" in capsys.readouterr().err


def test_copies_are_left_out_of_image_metrics_attackers_and_q_values(planted, tmp_path):
    """Image labels: each person's first photo (and its planted copies) is a training photo.
    Without --near-duplicates the copies count as more labelled members; with it they leave the
    image-level metrics, the attackers' fit sets and the q-values (their p-value stays)."""
    import json

    root, copies = planted
    out = root / "out"
    rows = pq.read_table(out / "samples", columns=["shard", "key", "status"]).to_pylist()
    labels = tmp_path / "labels.csv"
    labels.write_text("shard,key,member\n" + "".join(
        f"{r['shard']},{r['key']},{int(r['key'].endswith('_0') or 'copy' in r['key'])}\n" for r in rows))

    def reduce(*extra):
        assert main(["reduce", str(out), "--labels", str(labels), *extra]) == 0
        m = json.loads((out / "metrics.json").read_text())
        fitted = json.loads(next((out / "attackers").glob("mim*.json")).read_text())
        scores = pq.read_table(out / "sample_scores").to_pylist()
        return m, fitted, scores

    m, fitted, scores = reduce()
    assert m["mim"]["n_members"] == 12 + len(copies) and "near_duplicates" not in m
    assert fitted["fitted_on"]["images"] == len(rows)
    assert all(r["mim_qvalue"] is not None for r in scores if "copy" in r["key"])
    m, fitted, scores = reduce("--near-duplicates")
    assert m["mim"]["n_members"] == 12 and m["near_duplicates"]["copies"] == len(copies)
    assert m["mim"]["n_nonmembers"] == len(rows) - 12 - len(copies)  # no non-member is a copy here
    assert fitted["fitted_on"]["images"] == len(rows) - len(copies)
    by_key = {r["key"]: r for r in scores}
    assert len(by_key) == len(rows)  # every image keeps its row
    assert all(by_key[k]["mim_qvalue"] is None and by_key[k]["mim_pvalue"] is not None for k in copies)
    assert all(by_key[k]["mim_qvalue"] is not None for k in by_key if k not in copies and not by_key[k]["is_control"])


@pytest.mark.parametrize("max_bits", [0, 3, 6, 9])
def test_hash_pairs_are_every_pair_within_the_radius(max_bits):
    """The multi-hash index finds exactly the pairs a comparison of every pair finds."""
    from clipaudit.reduce.neighbours import hash_pairs

    rng = np.random.default_rng(max_bits)
    hashes = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=3000, dtype=np.int64)
    for _ in range(400):  # planted near pairs at 0..12 bits
        i, j = rng.integers(len(hashes), size=2)
        flips = sum(1 << int(b) for b in rng.choice(64, size=rng.integers(0, 13), replace=False))
        hashes[j] = (hashes[i].view(np.uint64) ^ np.uint64(flips)).view(np.int64)
    first, second, bits = hash_pairs(hashes, max_bits)
    u = hashes.view(np.uint64)
    xor = u[:, None] ^ u[None, :]
    dist = np.unpackbits(xor.view(np.uint8).reshape(len(u), len(u), 8), axis=2).sum(axis=2)
    expected = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(dist <= max_bits, k=1)))}
    assert set(zip(first.tolist(), second.tolist())) == expected and len(first) == len(expected)
    assert all(dist[i, j] == b for i, j, b in zip(first, second, bits))


def test_one_photo_under_two_names_is_not_merged_but_copies_within_a_name_are():
    import pyarrow as pa

    from clipaudit.reduce.neighbours import _copies_in_bucket

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, 16)).astype(np.float32)
    emb[1] = emb[0]  # Ann's copy of her photo 0
    emb[3] = emb[0]  # the same photo under Bob's name
    emb[2] = emb[0] + rng.normal(size=16)  # hash-identical, but another picture by its embedding
    t = pa.table({"shard": ["s"] * 5, "key": list("abcde"), "position": [0, 1, 2, 3, 4],
                  "identity": ["Ann", "Ann", "Ann", "Bob", "Bob"], "dhash": [7, 7, 7, 7, 12345],
                  "embedding": [list(map(float, e)) for e in emb]})
    rows = _copies_in_bucket(t, 0.95, 6)
    assert [(r[1], r[4]) for r in rows] == [("b", "a")]  # b is a copy of a; c, d and e are not copies
    assert rows[0][6] == pytest.approx(1.0) and rows[0][7] == 0
