"""The Ray executor on the canary lab: the acceptance numbers, resume, retries, parity;
on a tiny job: a shard that hangs, an actor broken by its task."""

import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import OTHER_EXECUTOR_TOL, MapEvents, assert_same_outputs, range_http_server, write_tiny_job

from clipaudit.app.runner import run_job
from clipaudit.app.jobs import load_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _spec(job, out, **compute):
    spec = load_job(job)
    return spec.model_copy(update={"output": out, "compute": spec.compute.model_copy(update=compute)})


@pytest.fixture(scope="module")
def trained_run(canary_lab, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "trained"
    return run_job(_spec(canary_lab.job, out, executor="ray", workers=2), progress=False)


def test_idia_separates_members_on_trained_model(trained_run, canary_lab):
    assert trained_run.ok and trained_run.summary["shards_done"] == len(canary_lab.shards)
    m = trained_run.metrics["idia"]
    # the lab's non-members whose names the pool lacks are left out of IDIA (missing_names: exclude), with a note
    assert m["n_members"] == len(canary_lab.members)
    assert m["n_nonmembers"] == len(canary_lab.nonmembers) - len(canary_lab.not_in_pool)
    assert sorted(m["missing_names"]["identities"]) == sorted(canary_lab.not_in_pool)
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
    assert_same_outputs(local.layout.root, trained_run.layout.root, OTHER_EXECUTOR_TOL)  # every column


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


def test_known_nonmember_controls_without_labels_give_pvalues_flags_and_thresholds(trained_run, canary_lab, tmp_path):
    import json
    import shutil

    from clipaudit.io.outputs import OutputLayout
    from clipaudit.report.query import run_query
    from clipaudit.reduce import reduce_outputs
    from clipaudit.reduce.options import ReduceOptions

    out = tmp_path / "calibrated"
    shutil.copytree(trained_run.layout.samples_dir, out / "samples")
    controls, held_out = canary_lab.nonmembers[::2], canary_lab.nonmembers[1::2]
    (tmp_path / "controls.csv").write_text("identity\n" + "".join(f"{n}\n" for n in controls))
    opts = ReduceOptions(attacks={"idia": {"missing_names": "exclude"}, "caption": {}}, names=canary_lab.names,
                         controls=tmp_path / "controls.csv", target_fpr=0.2)
    assert reduce_outputs(OutputLayout(out), opts).metrics == {}  # no labels: no metrics, but calibration
    assert not (out / "metrics.json").exists()
    cal = json.loads((out / "calibration.json").read_text())
    in_pool = [n for n in controls if n not in canary_lab.not_in_pool]  # the others are left out of IDIA
    assert cal["identity"]["idia"]["n_controls"] == len(in_pool) < len(controls) and cal["target_fpr"] == 0.2
    ident = {r["identity"]: r for r in pq.read_table(out / "identities.parquet").to_pylist()}
    left_out = set(controls) & set(canary_lab.not_in_pool)  # only named (labelled or control) ones are left out
    assert left_out and all((ident[n]["idia_pvalue"] is None) == (n in left_out)
                            for n in canary_lab.members + canary_lab.nonmembers)
    assert sum(ident[m]["idia_flag"] for m in canary_lab.members) >= 0.8 * len(canary_lab.members)
    held_in_pool = [n for n in held_out if n not in canary_lab.not_in_pool]  # the others have no IDIA p-value
    assert sum(ident[n]["idia_flag"] for n in held_in_pool) <= 0.5 * len(held_in_pool)
    # per image: one calibrated row per ok sample; flags agree with the reported threshold
    samples = {(r["shard"], r["position"]): r for r in pq.read_table(out / "samples").to_pylist()
               if r["status"] == "ok"}
    scores = pq.read_table(out / "sample_scores").to_pylist()
    assert sorted((r["shard"], r["position"]) for r in scores) == sorted(samples)
    assert all(r["is_control"] == (r["identity"] in controls) for r in scores)
    t = cal["image"]["caption"]["threshold"]
    assert cal["image"]["caption"]["n_controls"] == sum(r["is_control"] for r in scores)
    for r in scores:
        if not r["is_control"]:
            assert r["caption_flag"] == (samples[(r["shard"], r["position"])]["caption_score"] >= t)
    member_p = np.median([r["caption_pvalue"] for r in scores if r["identity"] in canary_lab.members])
    held_p = np.median([r["caption_pvalue"] for r in scores if r["identity"] in held_out])
    assert member_p < held_p
    _, rows = run_query(out, "SELECT count(*) FILTER (WHERE NOT is_control), count(*) FILTER (WHERE is_control) "
                             "FROM sample_scores WHERE caption_flag")
    assert list(rows[0]) == [cal["image"]["caption"]["flagged"],
                             cal["image"]["caption"]["controls_flagged_leave_one_out"]]
    assert cal["image"]["caption"]["control_identities"] == len(controls)


def test_unsatisfiable_worker_resources_fail_the_shards_with_a_reason_instead_of_hanging(canary_lab, ray_session,
                                                                                        tmp_path):
    spec = _spec(canary_lab.job, tmp_path / "o", executor="ray", resources_per_worker={"no_such_accelerator": 1},
                 actor_start_timeout_s=2)
    report = run_job(spec, progress=False)
    assert not report.ok and report.summary["shards_failed"] == len(canary_lab.shards)
    assert all("no_such_accelerator" in f["error"] and "within 2 s" in f["error"] for f in report.summary["failed"])
    assert report.summary["rows"] == 0


def _with_shards(spec, shards):
    """The job on other shards, unvalidated (the spec refuses shards that are not files)."""
    return spec.model_copy(update={"data": spec.data.model_copy(update={"shards": [str(s) for s in shards]})})


def _pid_gone(pid, within_s=20.0):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_a_shard_that_hangs_times_out_its_actor_is_killed_and_the_run_returns(tmp_path, tiny_model, ray_session):
    job = write_tiny_job(tmp_path, tiny_model, tmp_path / "out", shards=1, per_shard=8, attacks="{idia: {top_k: 3}}",
                         compute="executor: ray, workers: 2, max_retries: 1, shard_timeout_s: 3")
    hangs = tmp_path / "shards" / "hangs.tar"
    os.mkfifo(hangs)  # a named pipe no one writes to: opening it to read blocks forever
    good = tmp_path / "shards" / "00000.tar"
    spec = _with_shards(load_job(job), [hangs, good])
    t0 = time.monotonic()
    with MapEvents() as events:
        report = run_job(spec, progress=False)
    took = time.monotonic() - t0
    assert not report.ok and [d["shard"] for d in report.map.done] == [str(good)] and report.summary["rows"] == 8
    [failure] = report.map.failed
    assert failure.shard == str(hangs) and failure.attempts == 2, failure
    assert failure.error.startswith("timed out") and "shard_timeout_s = 3 s" in failure.error, failure.error
    # each attempt ran on its own actor, and each of those actors was killed, not given more work
    tried = [pid for shard, pid in events.of("dispatch") if shard == str(hangs)]
    assert len(tried) == 2 and len(set(tried)) == 2 and None not in tried, events.events
    assert events.of("timeout") == [(str(hangs), pid) for pid in tried], events.events
    assert all(_pid_gone(pid) for pid in tried), "a timed-out actor's process is still alive"
    assert took < 90, took  # two 3 s deadlines plus actor starts, not the default hour


def test_two_hung_shards_on_one_actor_time_out_together_and_the_run_returns(tmp_path, tiny_model, ray_session):
    """One actor holds two shards that both hang (one in the compute, one waiting behind it), so
    both deadlines pass in the same look: the one that waited goes back to the queue without an
    attempt (and hangs again on the replacement), each fails once, and a good shard is mapped."""
    job = write_tiny_job(tmp_path, tiny_model, tmp_path / "out", shards=1, per_shard=8, attacks="{idia: {top_k: 3}}",
                         compute="executor: ray, workers: 1, max_retries: 0, shard_timeout_s: 3, shards_in_flight: 2")
    hung = [tmp_path / "shards" / f"hangs-{i}.tar" for i in range(2)]
    for h in hung:
        os.mkfifo(h)  # opening it to read blocks forever
    good = tmp_path / "shards" / "00000.tar"
    with MapEvents() as events:
        report = run_job(_with_shards(load_job(job), [*hung, good]), progress=False)
    assert sorted((f.shard, f.attempts) for f in report.map.failed) == [(str(h), 1) for h in hung]
    assert all(f.error.startswith("timed out") for f in report.map.failed)
    assert [d["shard"] for d in report.map.done] == [str(good)] and report.summary["rows"] == 8
    requeued = [s for s, _ in events.of("requeued")]
    assert requeued and set(requeued) <= {*map(str, hung), str(good)}, events.events


def test_a_shard_waiting_behind_a_hung_one_is_not_blamed_for_its_timeout(tmp_path, tiny_model, ray_session):
    """One actor holds a slow-to-fetch shard (given out first, so its deadline is looked at
    first) and a hung one that took the compute lock meanwhile: the actor says which one
    computes, so the hung shard times out and the waiting one is requeued and mapped."""
    job = write_tiny_job(tmp_path, tiny_model, tmp_path / "out", shards=1, per_shard=8, attacks="{idia: {top_k: 3}}",
                         compute="executor: ray, workers: 1, max_retries: 0, shard_timeout_s: 6, shards_in_flight: 2")
    hangs = tmp_path / "shards" / "hangs.tar"
    os.mkfifo(hangs)  # opening it to read blocks forever (under the compute lock: a local shard is not fetched)
    with range_http_server(tmp_path / "shards", delay_s=0.5) as base, MapEvents() as events:
        slow = f"{base}/00000.tar"  # copied to scratch before the lock, in well under shard_timeout_s
        report = run_job(_with_shards(load_job(job), [slow, hangs]), progress=False)
    [failure] = report.map.failed
    assert (failure.shard, failure.attempts) == (str(hangs), 1) and failure.error.startswith("timed out"), failure
    assert [d["shard"] for d in report.map.done] == [slow] and report.summary["rows"] == 8
    assert [s for s, _ in events.of("timeout")] == [str(hangs)], events.events
    assert [s for s, _ in events.of("requeued")] == [slow], events.events


def test_an_actor_whose_task_raised_a_non_io_error_is_replaced_io_errors_keep_it(tmp_path, tiny_model, ray_session):
    # one shard at a time, so that each failure is the actor's only shard
    job = write_tiny_job(tmp_path, tiny_model, tmp_path / "out", shards=1, per_shard=8, attacks="{idia: {top_k: 3}}",
                         compute="executor: ray, workers: 1, max_retries: 1, shards_in_flight: 1")
    missing = tmp_path / "shards" / "missing.tar"  # FileNotFoundError: an OSError (transient I/O): actor kept
    broken = "nosuchproto://bucket/00001.tar"  # no fsspec backend: ImportError, not I/O: actor replaced
    good = tmp_path / "shards" / "00000.tar"
    spec = _with_shards(load_job(job), [missing, broken, good])
    with MapEvents() as events:
        report = run_job(spec, progress=False)
    failed = {f.shard: f for f in report.map.failed}
    assert set(failed) == {str(missing), broken} and all(f.attempts == 2 for f in failed.values())
    assert failed[str(missing)].error.startswith("FileNotFoundError")
    assert failed[broken].error.startswith("ImportError"), failed[broken].error
    assert [d["shard"] for d in report.map.done] == [str(good)] and report.summary["rows"] == 8
    dispatched = events.of("dispatch")
    assert len(dispatched) == 5 and None not in [pid for _, pid in dispatched], events.events
    for i, (shard, pid) in enumerate(dispatched):
        later = [p for _, p in dispatched[i + 1:]]
        if shard == broken:  # never handed another shard
            assert pid not in later and (broken, pid) in events.of("broken"), events.events
        elif shard == str(missing) and i == 0:  # handed the next shard
            assert later[0] == pid, events.events


def test_a_shard_waiting_on_an_actor_that_is_replaced_goes_back_to_the_queue_without_an_attempt(
        tmp_path, tiny_model, ray_session):
    """Two shards in flight on one actor: the first raises a non-I/O error (the actor is replaced);
    the second, which only waited behind it, is mapped by the replacement although no retry is
    allowed."""
    job = write_tiny_job(tmp_path, tiny_model, tmp_path / "out", shards=1, per_shard=40, attacks="{idia: {top_k: 3}}",
                         compute="executor: ray, workers: 1, max_retries: 0, shards_in_flight: 2")
    broken = "nosuchproto://bucket/00001.tar"  # ImportError when fetched: the actor is replaced at once
    good = tmp_path / "shards" / "00000.tar"
    spec = _with_shards(load_job(job), [broken, good])
    with MapEvents() as events:
        report = run_job(spec, progress=False)
    assert [f.shard for f in report.map.failed] == [broken] and report.map.failed[0].attempts == 1
    assert [d["shard"] for d in report.map.done] == [str(good)] and report.summary["rows"] == 40
    [(_, first), (_, second)] = [e for e in events.of("dispatch") if e[0] == str(good)]
    assert events.of("dispatch")[0] == (broken, first) and (broken, first) in events.of("broken"), events.events
    assert events.of("requeued") == [(str(good), first)] and second not in (first, None), events.events


def test_a_pool_sized_by_the_cluster_grows_when_room_appears(tmp_path, tiny_model, ray_session, monkeypatch, caplog):
    """A pool sized by the cluster's GPUs (or custom resources) looks at the cluster while it maps:
    a node that joins gets actors, which take shards. Here the cluster 'grows' from room for one
    actor to room for two (what ``_slots`` reads from ``ray.cluster_resources()``)."""
    import logging

    from clipaudit.executors.ray import RayExecutor

    # enough shards that the first actor is still at work when the second has started
    job = write_tiny_job(tmp_path, tiny_model, tmp_path / "out", shards=60, per_shard=8, attacks="{idia: {top_k: 3}}",
                         compute="executor: ray, max_retries: 0, cpus_per_worker: 0.5")
    looks = []

    def slots(self, spec):
        looks.append(time.monotonic())
        # the pool's size: one; then a node joins, at the first check (0.5 s into the map step), so that the
        # second actor starts while the first one still has shards to take (two in flight per actor)
        return 1 if len(looks) <= 1 else 2

    monkeypatch.setattr(RayExecutor, "_slots", slots)
    monkeypatch.setattr(RayExecutor, "POOL_CHECK_S", 0.5)
    # caplog first: MapEvents then sets the executor's logger to DEBUG (its dispatch records)
    with caplog.at_level(logging.INFO, logger="clipaudit.executors.ray"), MapEvents() as events:
        report = run_job(load_job(job), progress=False)
    assert report.ok and report.summary["rows"] == 60 * 8
    assert any("room for 2 map actor(s): started 1" in r.getMessage() for r in caplog.records), caplog.text
    assert len({pid for _, pid in events.of("dispatch")}) == 2, events.events  # the new actor took shards
