"""Fault injection on the Ray executor: a map worker SIGKILLed in the middle of a shard."""

import os
import signal
import subprocess
import threading
import time

import pyarrow.parquet as pq
import pytest
from helpers import image_bytes, sample_files, write_tar

from clipaudit.runner import run_job
from clipaudit.spec import load_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.faults]


def _job(tmp_path, tiny_model, out):
    (tmp_path / "shards").mkdir(exist_ok=True)
    for s in range(2):
        members = []
        for i in range(120):
            members += sample_files(f"{s}{i:08d}", f"P{i % 5}", image_bytes(seed=s * 1000 + i, size=(64, 48)))
        write_tar(tmp_path / "shards" / f"{s:05d}.tar", members)
    (tmp_path / "names.txt").write_text("\n".join(f"P{i}" for i in range(8)) + "\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(f"""
model: {{name: {tiny_model['config']}, pretrained: {tiny_model['checkpoint']}, precision: fp32}}
data: {{shards: "shards/{{00000..00001}}.tar"}}
names: names.txt
attacks: {{idia: {{top_k: 3}}, encodermi: {{views: 16}}}}
compute: {{executor: ray, workers: 1, batch_size: 4, decode_threads: 1, max_retries: 2}}
output: {out}
""")
    return load_spec(spec)


def _rows(out):
    t = pq.read_table(out / "samples", columns=["shard", "position", "key", "status", "idia_top1"]).to_pylist()
    return sorted(t, key=lambda r: (r["shard"], r["position"]))


def test_worker_killed_mid_shard_is_retried_without_loss_or_duplicates(tmp_path, tiny_model, ray_session):
    spec = _job(tmp_path, tiny_model, tmp_path / "killed")
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
