"""The name state: built in parts, kept by key in a store, reused by later jobs, never copied whole."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import write_tiny_job

import clipaudit.map.state as state_mod
from clipaudit.app.jobs import load_job
from clipaudit.app.resolve import pinned
from clipaudit.app.runner import run_job
from clipaudit.attacks import build_attacks
from clipaudit.attacks.idia import IdiaAttack
from clipaudit.map.state import plan_state
from clipaudit.model.loading import load_model


def _job(tmp_path, tiny_model, out: str, compute: str = "executor: local, max_retries: 0"):
    job = write_tiny_job(tmp_path, tiny_model, tmp_path / out, shards=2, per_shard=6, compute=compute)
    job.write_text(job.read_text().replace("compute: {", f"compute: {{state_dir: {tmp_path / 'states'}, "))
    return job


def _rows(out):
    return sorted(pq.read_table(out / "samples").to_pylist(), key=lambda r: r["key"])


def _count_slices(monkeypatch) -> list[tuple[int, int]]:
    built: list[tuple[int, int]] = []
    real = IdiaAttack.state_slice

    def spy(self, model, start, stop):
        built.append((start, stop))
        return real(self, model, start, stop)

    monkeypatch.setattr(IdiaAttack, "state_slice", spy)
    return built


def test_the_state_is_built_in_parts_once_and_reused_by_a_later_job(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(state_mod, "ITEMS_PER_PART", 3)  # 8 names: parts of 3, 3 and 2
    built = _count_slices(monkeypatch)
    first = run_job(load_job(_job(tmp_path, tiny_model, "first")), progress=False)
    assert first.ok and built == [(0, 3), (3, 6), (6, 8)]
    [manifest_path] = (tmp_path / "states").glob("idia-*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert [(p["start"], p["stop"]) for p in manifest["parts"]] == built and manifest["shape"][:2] == [21, 8]
    assert not (first.layout.state_dir).exists()  # compute.state_dir: nothing in the output's own _state/

    # the parts, put together, are the state computed in one piece from the model
    spec = pinned(load_job(_job(tmp_path, tiny_model, "first")), "cpu")
    idia = next(a for a in build_attacks(spec) if a.name == "idia")
    model = load_model(spec.model.name, spec.model.pretrained, "fp32", "cpu")
    whole = idia.state_slice(model, 0, 8)
    parts = [np.load(manifest_path.parent / p["file"]) for p in manifest["parts"]]
    assert all(p.dtype == np.float16 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)

    # a later job (another output) with the same model and pool builds nothing and maps the same rows
    built.clear()
    second = run_job(load_job(_job(tmp_path, tiny_model, "second")), progress=False)
    assert second.ok and built == []
    assert _rows(second.layout.root) == _rows(first.layout.root)  # every column

    # a state that lost a part (and so its manifest) is completed, not rebuilt
    (manifest_path.parent / "part-00001.npy").unlink()
    manifest_path.unlink()
    third = run_job(load_job(_job(tmp_path, tiny_model, "third")), progress=False)
    assert third.ok and built == [(0, 3), (3, 6), (6, 8)][1:2]
    assert json.loads(manifest_path.read_text())["parts"] == manifest["parts"]
    assert _rows(third.layout.root) == _rows(first.layout.root)


def test_the_state_key_changes_with_what_the_state_depends_on_and_only_that(tiny_model, tmp_path):
    job = _job(tmp_path, tiny_model, "out")
    def key(spec):
        return plan_state(spec, next(a for a in build_attacks(spec) if a.name == "idia")).key

    base = pinned(load_job(job), "cpu")
    base_key = key(base)

    text = job.read_text()
    job.write_text(text.replace("{idia: {top_k: 3}", "{idia: {top_k: 5}"))  # a map parameter the state ignores
    assert key(pinned(load_job(job), "cpu")) == base_key
    job.write_text(text.replace("{idia: {top_k: 3}", "{idia: {top_k: 3, templates: ['a photo of {}.']}"))
    assert key(pinned(load_job(job), "cpu")) != base_key
    job.write_text(text)
    (tmp_path / "names.txt").write_text((tmp_path / "names.txt").read_text() + "P8\n")  # another pool
    assert key(pinned(load_job(job), "cpu")) != base_key
    (tmp_path / "names.txt").write_text("".join(f"P{i}\n" for i in range(8)))
    assert key(base) == base_key
    assert key(base.model_copy(update={"compute": base.compute.model_copy(update={"device": "cuda"})})) != base_key


def test_the_ray_executor_spreads_the_parts_over_tasks_and_maps_as_the_local_one(
        tiny_model, tmp_path, monkeypatch, ray_session):
    monkeypatch.setattr(state_mod, "ITEMS_PER_PART", 3)
    local = run_job(load_job(_job(tmp_path, tiny_model, "local")), progress=False)
    for p in (tmp_path / "states").iterdir():  # start from no state at all
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    job = _job(tmp_path, tiny_model, "ray", compute="executor: ray, workers: 2, cpus_per_worker: 0.5, max_retries: 1")
    ray = run_job(load_job(job), progress=False)
    assert ray.ok
    [manifest_path] = (tmp_path / "states").glob("idia-*/manifest.json")
    assert [(p["start"], p["stop"]) for p in json.loads(manifest_path.read_text())["parts"]] == [(0, 3), (3, 6), (6, 8)]
    assert _rows(ray.layout.root) == _rows(local.layout.root)


def test_a_state_whose_part_does_not_match_the_manifest_is_an_error(tiny_model, tmp_path):
    report = run_job(load_job(_job(tmp_path, tiny_model, "out")), progress=False)
    assert report.ok
    [part] = (tmp_path / "states").glob("idia-*/part-00000.npy")
    np.save(part, np.zeros((21, 5, 4), dtype=np.float16))  # a different array under the same name
    spec = pinned(load_job(_job(tmp_path, tiny_model, "out")), "cpu")
    folder = state_mod.job_states(spec, report.layout, build_attacks(spec))[0][1]
    with pytest.raises(ValueError, match="manifest says 8 items"):
        folder.open()
