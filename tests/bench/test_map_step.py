"""`clipaudit bench` runs the three measurements on the same shards and names the machine."""

import json

from clipaudit.bench.map_step import format_bench, run_bench, write_synthetic_shards
from clipaudit.data.tar_reader import iter_tar_samples


def test_synthetic_shards_hold_exactly_the_requested_images(tmp_path):
    paths = write_synthetic_shards(tmp_path, n_images=10, per_shard=4, size=40, n_names=3)
    assert len(paths) == 3
    samples = [s for p in paths for s in iter_tar_samples(str(p))]
    assert len(samples) == 10 and all(set(s.files) == {"jpg", "json", "txt"} for s in samples)


def test_bench_reports_rates_and_ratios_against_model_only(tiny_model, tmp_path):
    r = run_bench(model=str(tiny_model["config"]), pretrained=str(tiny_model["checkpoint"]), precision="fp32",
                  device="cpu", n_images=24, batch_size=8, attacks="all", image_px=48, n_names=20,
                  workdir=tmp_path)
    rates = r["images_per_s"]
    assert set(rates) == {"model_only", "decode_only", "map"} and all(v > 0 for v in rates.values())
    assert set(r["ratio_to_model_only"]) == {"decode_only", "map"}
    assert r["machine"]["cpu"] and r["machine"]["device"] == "cpu" and r["images"] == 24
    assert ((tmp_path / "out" / "samples").is_dir()
            and len(list((tmp_path / "out" / "_markers").glob("*.done.json"))) == 2)  # + the warm-up shard
    text = format_bench(r)
    assert "model only" in text and "map step" in text and r["machine"]["cpu"] in text
    json.dumps(r)  # the record is plain JSON

