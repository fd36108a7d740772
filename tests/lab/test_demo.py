"""``clipaudit demo``: both models mapped, then each reduced while the next one maps, with
everything a full run writes."""

from __future__ import annotations

import json
import shutil

from clipaudit.lab import demo


def test_demo_maps_both_models_and_reduces_each(canary_lab, ray_session, tmp_path, monkeypatch, capsys):
    lab = tmp_path / "lab"
    shutil.copytree(canary_lab.root, lab)

    def built_lab(root, cfg, control_ready):
        control_ready()
        return lab / "job.yaml", lab / "job-untrained.yaml"

    monkeypatch.setattr(demo, "_lab", built_lab)

    assert demo.run_demo(tmp_path, progress=False) == 0

    out = capsys.readouterr().out
    auc = {}
    for label in ("trained", "untrained"):
        folder = tmp_path / label
        summary = json.loads((folder / "_SUMMARY.json").read_text())
        # the reduce step counted what the map-only run left to it
        assert summary["duplicate_keys_across_shards"] == {"keys": 0, "rows": 0}
        assert summary["shards_done"] == len(canary_lab.shards) and summary["failed"] == []
        assert json.loads((folder / "_REDUCE.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        auc[label] = metrics["idia"]["auc"]
        assert (folder / "identities.parquet").is_file() and (folder / "manifest.json").is_file()
        assert f"== the {label} model's audit ==" in out
    assert auc["trained"] > 0.9 > auc["untrained"]
    assert out.index("model trained on the members: all attacks") < out.index("untrained control: all attacks")
