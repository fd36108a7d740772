"""The Ray executor on the canary lab: the acceptance numbers, resume, retries, parity."""

import pyarrow.parquet as pq
import pytest

from clipaudit.runner import run_job
from clipaudit.spec import load_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _spec(job, out, **compute):
    spec = load_spec(job)
    return spec.model_copy(update={"output": out, "compute": spec.compute.model_copy(update=compute)})


def _sorted_rows(out):
    t = pq.read_table(out / "samples").drop_columns(["caption_score"]).to_pylist()
    return sorted(t, key=lambda r: (r["shard"], r["position"]))


@pytest.fixture(scope="module")
def trained_run(canary_lab, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "trained"
    return run_job(_spec(canary_lab.job, out, executor="ray", workers=2), progress=False)


def test_idia_separates_members_on_trained_model(trained_run, canary_lab):
    assert trained_run.ok and trained_run.summary["shards_done"] == len(canary_lab.shards)
    m = trained_run.metrics["idia"]
    assert m["n_members"] == len(canary_lab.members) and m["n_nonmembers"] == len(canary_lab.nonmembers)
    assert m["auc"] >= 0.95, m
    ident = pq.read_table(trained_run.layout.identities).to_pylist()
    assert {r["identity"] for r in ident if r["in_name_pool"] is False} == set(canary_lab.not_in_pool)


def test_untrained_model_is_near_chance(canary_lab, ray_session, tmp_path):
    report = run_job(_spec(canary_lab.job_untrained, tmp_path / "u", executor="ray", workers=2), progress=False)
    assert report.metrics["idia"]["auc"] < 0.75, report.metrics["idia"]


def test_rerun_skips_everything(trained_run, canary_lab, ray_session):
    spec = _spec(canary_lab.job, trained_run.layout.root, executor="ray", workers=2)
    again = run_job(spec, progress=False)
    assert again.skipped == len(canary_lab.shards) and not again.map.done
    assert again.summary["rows"] == trained_run.summary["rows"]


def test_local_executor_gives_the_same_rows(trained_run, canary_lab, tmp_path):
    local = run_job(_spec(canary_lab.job, tmp_path / "local", executor="local"), progress=False)
    assert _sorted_rows(local.layout.root) == _sorted_rows(trained_run.layout.root)


def test_shard_that_always_fails_is_retried_then_reported(canary_lab, ray_session, tmp_path):
    import shutil

    shards = [str(tmp_path / f"{i}.tar") for i in range(2)]
    for src, dst in zip(canary_lab.shards, shards):
        shutil.copy(src, dst)
    spec = _spec(canary_lab.job, tmp_path / "out", executor="ray", workers=2, max_retries=1)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"shards": shards})})
    (tmp_path / "1.tar").unlink()  # vanishes after validation: every attempt fails
    report = run_job(spec, progress=False)
    assert not report.ok
    assert [f.shard for f in report.map.failed] == [shards[1]] and report.map.failed[0].attempts == 2
    assert "FileNotFoundError" in report.map.failed[0].error
    assert report.summary["shards_done"] == 1 and report.summary["shards_failed"] == 1
