"""Fault injection on the Ray executor: a map worker SIGKILLed mid-shard, the driver
SIGKILLed mid-job and rerun, a whole worker node lost mid-job. Each run's rows must equal
those of an uninterrupted run: nothing lost, nothing duplicated."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import image_bytes, sample_files, write_tar

from clipaudit.runner import run_job
from clipaudit.spec import load_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.faults]


def _job(tmp_path, tiny_model, out, shards=2, per_shard=120, compute="executor: ray, workers: 1"):
    (tmp_path / "shards").mkdir(exist_ok=True)
    for s in range(shards):
        members = []
        for i in range(per_shard):
            members += sample_files(f"{s}{i:08d}", f"P{i % 5}", image_bytes(seed=s * 1000 + i, size=(64, 48)))
        write_tar(tmp_path / "shards" / f"{s:05d}.tar", members)
    (tmp_path / "names.txt").write_text("\n".join(f"P{i}" for i in range(8)) + "\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(f"""
model: {{name: {tiny_model['config']}, pretrained: {tiny_model['checkpoint']}, precision: fp32}}
data: {{shards: "shards/{{00000..{shards - 1:05d}}}.tar"}}
names: names.txt
attacks: {{idia: {{top_k: 3}}, encodermi: {{views: 16}}}}
compute: {{{compute}, batch_size: 4, decode_threads: 1, max_retries: 2}}
output: {out}
""")
    return spec


def _reference_rows(spec_path, out):
    """Rows of an uninterrupted run (in-process executor: it gives the same rows as Ray)."""
    spec = load_spec(spec_path)
    compute = spec.compute.model_copy(update={"executor": "local"})
    run_job(spec.model_copy(update={"output": out, "compute": compute}), progress=False)
    return _rows(out)


def _rows(out):
    t = pq.read_table(out / "samples", columns=["shard", "position", "key", "status", "idia_top1"]).to_pylist()
    return sorted(t, key=lambda r: (r["shard"], r["position"]))


def test_worker_killed_mid_shard_is_retried_without_loss_or_duplicates(tmp_path, tiny_model, ray_session):
    spec = load_spec(_job(tmp_path, tiny_model, tmp_path / "killed"))
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            tmp = [p for p in (tmp_path / "killed" / "samples").glob(".*tmp-*")] if (tmp_path / "killed" / "samples").exists() else []
            if tmp:
                pids = subprocess.run(["pgrep", "-f", "ray::_MapWorker.map_shard"], capture_output=True, text=True).stdout.split()
                if pids:
                    os.kill(int(pids[0]), signal.SIGKILL)
                    killed.append(int(pids[0]))
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    report = run_job(spec, progress=False)
    t.join()
    assert killed, "the test never caught a worker mid-shard"
    assert report.ok and report.summary["rows"] == 240
    visible = sorted(p.name for p in (tmp_path / "killed" / "samples").iterdir() if not p.name.startswith("."))
    assert len([n for n in visible if n.endswith(".parquet")]) == 2
    clean = run_job(spec.model_copy(update={"output": tmp_path / "clean"}), progress=False)
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "clean")
    assert clean.summary["rows"] == 240


def test_driver_killed_mid_job_then_rerun_completes_without_loss_or_duplicates(tmp_path, tiny_model, ray_session):
    out = tmp_path / "out"
    job = _job(tmp_path, tiny_model, out, shards=4, per_shard=60)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-m", "clipaudit.cli", "run", str(job), "--no-progress"],
                              start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and driver.poll() is None:
            if list((out / "samples").glob("_*.done.json")) if (out / "samples").is_dir() else []:
                break
            time.sleep(0.02)
        assert driver.poll() is None, "the driver ended before it could be killed: " + driver.stderr.read().decode()[-2000:]
        driver.kill()  # SIGKILL: no cleanup code runs
        driver.wait()
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # Ray processes the killed driver had started
        except ProcessLookupError:
            pass
    done_before = len(list((out / "samples").glob("_*.done.json")))
    assert 1 <= done_before < 4
    report = run_job(load_spec(job), progress=False)  # rerun (on the test session's Ray)
    assert report.ok and report.skipped == done_before and len(report.map.done) == 4 - done_before
    rows = _rows(out)
    assert len(rows) == 240 == len({(r["shard"], r["position"]) for r in rows})
    assert rows == _reference_rows(job, tmp_path / "clean")
    assert not [p for p in (out / "samples").iterdir() if p.name.startswith(".") and "tmp" in p.name]


def test_worker_node_lost_mid_job_shards_finish_on_the_survivor(tmp_path, tiny_model):
    out = tmp_path / "out"
    job = _job(tmp_path, tiny_model, out, shards=6, per_shard=60,
               compute="executor: ray, cpus_per_worker: 0.5, resources_per_worker: {accelerator_slot: 1}")
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
    rows = _rows(out)
    assert len(rows) == 360 == len({(r["shard"], r["position"]) for r in rows})
    assert rows == _reference_rows(job, tmp_path / "clean")
