"""attacks.<name>.sample: an image-side attack scores a few images per identity, IDIA every image."""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import pytest
from helpers import write_tiny_job

from clipaudit.app.jobs import load_job
from clipaudit.app.runner import ResumeRefused, run_job


def _sampled_job(tmp_path, tiny_model, labels: str):
    job = write_tiny_job(tmp_path, tiny_model, tmp_path / "out", shards=2, per_shard=12,
                         compute="executor: local, max_retries: 0", identities=4,
                         attacks="{idia: {top_k: 3}, partcrop: {crops: 4, sample: {per_identity: 2}}}")
    (tmp_path / "labels.csv").write_text(labels)
    job.write_text(job.read_text() + "labels: labels.csv\n")
    return job


def test_a_sampled_attack_scores_two_rows_per_identity_and_shard_and_idia_every_row(tiny_model, tmp_path):
    job = _sampled_job(tmp_path, tiny_model, "identity,member\nP0,true\nP1,false\n")
    report = run_job(load_job(job), progress=False)
    assert report.ok and report.summary["ok"] == 24
    rows = pq.read_table(report.layout.samples_dir).to_pylist()
    scored = Counter((r["shard"], r["identity"]) for r in rows if r["partcrop_score"] is not None)
    ok = Counter((r["shard"], r["identity"]) for r in rows if r["status"] == "ok")
    for (shard, ident), n in ok.items():  # 3 images of each identity per shard
        want = n if ident in ("P0", "P1") else 2  # labelled identities: every image
        assert scored[shard, ident] == want, (shard, ident)
    sampled = [r for r in rows if r["partcrop_score"] is not None]
    assert all(r["partcrop_features"] is not None for r in sampled)
    assert all(r["partcrop_features"] is None for r in rows if r["partcrop_score"] is None)
    assert all(r["idia_true_rank"] is not None for r in rows if r["status"] == "ok")  # IDIA: every row
    entry = report.metrics["partcrop"]["sample"]
    assert entry["scored_images"] == sum(scored.values()) == 20 and entry["ok_images"] == 24
    from clipaudit.report.text import metrics_table

    assert any(line.startswith("partcrop: scored 20 of 24 ok images") for line in metrics_table(report.metrics))

    # the labels decide which rows a sample keeps: other labels are another map step
    (tmp_path / "labels.csv").write_text("identity,member\nP2,true\nP1,false\n")
    with pytest.raises(ResumeRefused, match="sample_keeps"):
        run_job(load_job(job), progress=False)
