"""An attack declared outside the engine (tests/attacks/brightness_plugin.py), named only by
the job's ``plugins:`` list, flows through run → samples → identities → metrics → report —
on Ray actors, which import the plugin themselves when they read the job."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from clipaudit.cli import main

PLUGIN = Path(__file__).with_name("brightness_plugin.py")
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _job(canary_lab, out: Path, executor: str) -> Path:
    raw = yaml.safe_load(canary_lab.job.read_text())
    raw.update(plugins=[str(PLUGIN)], output=str(out),
               attacks={"idia": {"top_k": 5, "missing_names": "exclude"}, "brightness": {"gamma": 2.0}},
               compute={"executor": executor, "workers": 2, "batch_size": 32})
    path = canary_lab.job.with_name(f"job-plugin-{executor}-{out.name}.yaml")  # relative paths: the lab's folder
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def plugin_run(canary_lab, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("plugin") / "ray"
    assert main(["run", str(_job(canary_lab, out, "ray")), "--no-progress"]) == 0
    return out


def test_plugin_columns_are_computed_on_ray_actors(plugin_run):
    rows = pq.read_table(plugin_run / "samples").to_pylist()
    assert {"brightness_score", "brightness_features"} <= set(rows[0])
    ok = [r for r in rows if r["status"] == "ok"]
    score = np.array([r["brightness_score"] for r in ok], dtype=float)
    features = np.array([r["brightness_features"] for r in ok], dtype=float)
    assert len(ok) > 0 and np.all((score > 0) & (score < 1)) and score.std() > 0
    # mean over pixels of x**2 is the mean of the per-channel means of x**2 (float32 round-off)
    np.testing.assert_allclose(score, features.mean(axis=1), rtol=1e-5)
    # the built-in attacks that are off stay null; the enabled built-in one is filled
    assert all(r["encodermi_score"] is None and r["idia_top1"] is not None for r in ok)


def test_plugin_scores_reach_identities_metrics_and_report(plugin_run, canary_lab, capsys):
    per_identity: dict[str, list[float]] = {}
    for r in pq.read_table(plugin_run / "samples").to_pylist():
        if r["status"] == "ok":
            per_identity.setdefault(r["identity"], []).append(r["brightness_score"])
    ident = {r["identity"]: r for r in pq.read_table(plugin_run / "identities.parquet").to_pylist()}
    assert set(per_identity) <= set(ident)
    for name, values in per_identity.items():
        assert ident[name]["brightness_score"] == pytest.approx(float(np.mean(values)), rel=1e-6)
    assert any(r["brightness_pvalue"] is not None for r in ident.values())  # labelled non-members are controls

    import json

    metrics = json.loads((plugin_run / "metrics.json").read_text())
    m = metrics["brightness"]
    # the lab labels identities only: an image-level score is scored per identity (its mean)
    assert m["level"] == "identity" and 0 <= m["auc"] <= 1 and m["n_members"] > 0
    assert m["learned"]["level"] == "identity" and "auc" in m["learned"]
    scores = pq.read_table(plugin_run / "sample_scores")
    assert "brightness_pvalue" in scores.column_names

    import subprocess
    import sys

    # a fresh process, which has never imported the plugin: the report loads the job's plugins itself
    p = subprocess.run([sys.executable, "-m", "clipaudit.cli", "report", str(plugin_run)], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert any(line.startswith("brightness ") for line in lines)
    assert any(line.startswith("  brightness (learned)") for line in lines)


def test_reduce_only_plugin_setting_needs_no_recompute_and_map_settings_are_refused(plugin_run, capsys):
    assert main(["reduce", str(plugin_run), "--set", "brightness.label=x"]) == 0
    assert main(["reduce", str(plugin_run), "--set", "brightness.gamma=3"]) == 2
    assert "changes the map step" in capsys.readouterr().err


def test_local_executor_gives_the_same_plugin_rows(plugin_run, canary_lab, tmp_path):
    out = tmp_path / "local"
    assert main(["run", str(_job(canary_lab, out, "local")), "--no-progress"]) == 0
    cols = ["shard", "position", "key", "status", "identity", "brightness_score", "brightness_features"]

    def rows(root):
        return sorted(pq.read_table(root / "samples", columns=cols).to_pylist(),
                      key=lambda r: (r["shard"], r["position"]))

    a, b = rows(plugin_run), rows(out)
    assert [[r[c] for c in cols[:5]] for r in a] == [[r[c] for c in cols[:5]] for r in b]
    for c in cols[5:]:
        x = np.array([r[c] if r[c] is not None else np.nan for r in a], dtype=float)
        y = np.array([r[c] if r[c] is not None else np.nan for r in b], dtype=float)
        np.testing.assert_allclose(x, y, atol=1e-6, err_msg=c)
