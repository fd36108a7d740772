"""Fault injection on the Ray executor: a map worker SIGKILLed mid-shard, the driver
SIGKILLed mid-job and rerun, a whole worker node lost mid-job. Each run's outputs must equal
those of an uninterrupted run in every column of samples/ and embeddings/: nothing lost,
nothing duplicated, nothing changed (float tolerances: tests/helpers.py)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import OTHER_EXECUTOR_TOL, SAME_EXECUTOR_TOL, MapEvents, assert_same_outputs, write_tiny_job

from clipaudit.io.outputs import OutputLayout
from clipaudit.app.runner import run_job
from clipaudit.app.jobs import load_job

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.faults]

def _reference_run(spec_path, out):
    """An uninterrupted run (in-process executor: it gives the same rows as Ray)."""
    spec = load_job(spec_path)
    compute = spec.compute.model_copy(update={"executor": "local"})
    run_job(spec.model_copy(update={"output": out, "compute": compute}), progress=False)
    return out


def _is_map_worker(pid: int) -> bool:
    try:
        return "_MapWorker" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_worker_killed_mid_shard_is_retried_without_loss_or_duplicates(tmp_path, tiny_model, ray_session):
    out = tmp_path / "killed"
    spec = load_job(write_tiny_job(tmp_path, tiny_model, out))
    layout = OutputLayout(out)
    killed = []

    def killer(events: MapEvents) -> None:
        """SIGKILL this run's actor (its pid as the actor reported it) while its shard's part is half-written."""
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            dispatched = events.of("dispatch")
            if dispatched:
                shard, pid = dispatched[-1]  # workers: 1 — the pool's one actor, on this shard now
                part = layout.sample_part(shard)
                writing = layout.temp_files(part)
                if writing and not layout.marker(shard).exists() and _is_map_worker(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed.append((shard, pid))
            time.sleep(0.05)

    with MapEvents() as events:
        t = threading.Thread(target=killer, args=(events,))
        t.start()
        report = run_job(spec, progress=False)
        t.join()
    assert killed, "the test never caught a worker mid-shard"
    shard, pid = killed[0]
    # the kill hit that shard's actor mid-shard: the actor died on it, and the shard was mapped again elsewhere
    assert (shard, pid) in events.of("died"), events.events
    attempts = [p for s, p in events.of("dispatch") if s == shard]
    assert len(attempts) == 2 and attempts[0] == pid and attempts[1] not in (pid, None), events.events
    assert report.ok and report.summary["rows"] == 240
    visible = sorted(p.name for p in (out / "samples").iterdir() if not p.name.startswith("."))
    assert len([n for n in visible if n.endswith(".parquet")]) == 2
    clean = run_job(spec.model_copy(update={"output": tmp_path / "clean"}), progress=False)
    assert clean.summary["rows"] == 240
    assert_same_outputs(out, tmp_path / "clean", SAME_EXECUTOR_TOL)


def test_driver_killed_mid_job_then_rerun_completes_without_loss_or_duplicates(tmp_path, tiny_model, ray_session):
    out = tmp_path / "out"
    job = write_tiny_job(tmp_path, tiny_model, out, shards=4, per_shard=60)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-m", "clipaudit.cli", "run", str(job), "--no-progress"],
                              start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and driver.poll() is None:
            if list((out / "_markers").glob("*.done.json")) if (out / "_markers").is_dir() else []:
                break
            time.sleep(0.02)
        assert driver.poll() is None, ("the driver ended before it could be killed: "
                                       + driver.stderr.read().decode()[-2000:])
        driver.kill()  # SIGKILL: no cleanup code runs
        driver.wait()
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # Ray processes the killed driver had started
        except ProcessLookupError:
            pass
    done_before = len(list((out / "_markers").glob("*.done.json")))
    assert 1 <= done_before < 4
    report = run_job(load_job(job), progress=False)  # rerun (on the test session's Ray)
    assert report.ok and report.skipped == done_before and len(report.map.done) == 4 - done_before
    assert_same_outputs(out, _reference_run(job, tmp_path / "clean"), OTHER_EXECUTOR_TOL)  # 240 rows, once each
    assert not list((out / "_tmp").iterdir())
    assert all(p.suffix == ".parquet" for p in (out / "samples").iterdir())


def test_worker_node_lost_mid_job_shards_finish_on_the_survivor(tmp_path, tiny_model):
    out = tmp_path / "out"
    job = write_tiny_job(tmp_path, tiny_model, out, shards=6, per_shard=60,
                         compute="executor: ray, cpus_per_worker: 0.5, resources_per_worker: {accelerator_slot: 1}, "
                                 "max_retries: 2")
    script = Path(__file__).with_name("node_loss_job.py")
    report_path = tmp_path / "report.json"
    p = subprocess.run([sys.executable, str(script), str(job), str(out), str(report_path)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["event"], "the node was never removed mid-job"
    assert report["event"]["markers_before"] < 6
    assert any("map actor died" in w for w in report["executor_warnings"]), report["executor_warnings"]
    assert report["ok"] and report["summary"]["shards_done"] == 6 and report["summary"]["rows"] == 360
    assert report["stale_temps"], "no shard was interrupted by the node loss"  # the lost node's half-written part
    assert_same_outputs(out, _reference_run(job, tmp_path / "clean"), OTHER_EXECUTOR_TOL)  # 360 rows, once each
