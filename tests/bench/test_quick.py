"""``clipaudit bench --quick --json``: one JSON object on stdout with every figure the
speed issue names (the figures themselves are measured, never asserted here)."""

import json

import pytest

KEYS = {"device", "model", "batch_size", "model_only_images_per_s", "e2e_images_per_s", "e2e_vs_model_ratio",
        "naive_images_per_s", "speedup_vs_naive", "augment_speedup_vs_pil", "names_per_s", "recall_at_10",
        "peak_rss_mb_1x", "peak_rss_mb_10x", "actors_1_vs_2_efficiency"}


@pytest.mark.slow
def test_quick_bench_prints_one_json_object_with_every_figure(monkeypatch, capsys):
    import clipaudit.bench.quick as quick
    from clipaudit.cli import main

    real = quick.run_quick
    monkeypatch.setattr(quick, "run_quick", lambda log: real(n_images=128, names=50, index_names=3000, log=log))
    assert main(["bench", "--quick", "--json", "--quiet"]) == 0
    out = capsys.readouterr().out
    record = json.loads(out)  # the whole of stdout is one object
    assert KEYS <= set(record)
    rates = [record[k] for k in ("model_only_images_per_s", "e2e_images_per_s", "naive_images_per_s", "names_per_s")]
    assert all(r > 0 for r in rates)
    assert 0 <= record["recall_at_10"] <= 1 and record["peak_rss_mb_10x"] > 0
    # the ratio comes from the unrounded rates; the printed rates are rounded to 0.1 image/s
    e2e, model = record["e2e_images_per_s"], record["model_only_images_per_s"]
    rounding = 0.05 / model + 0.05 * e2e / model ** 2 + 5e-4
    assert record["e2e_vs_model_ratio"] == pytest.approx(e2e / model, abs=rounding)
