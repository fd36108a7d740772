"""An audit submitted through the Ray Jobs API (`ray job submit`) to a two-node Ray cluster
started here with `ray start` on 127.0.0.1 — as on a real cluster, where the job's driver runs
on the head node and the outputs go to shared storage (here: an absolute path on this disk)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import OTHER_EXECUTOR_TOL, assert_same_outputs, write_tiny_job

from clipaudit.runner import run_job
from clipaudit.spec import load_spec

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(temp_dir: str) -> None:
    """Stop only this test's Ray processes (``ray stop`` would stop the test session's Ray too)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if temp_dir.encode() in cmd:
                try:
                    os.kill(int(entry), 9)
                except OSError:
                    pass


def test_a_job_submitted_to_a_two_node_cluster_completes(tiny_model, tmp_path):
    pytest.importorskip("ray.dashboard", reason="Ray Jobs need the ray[default] extra (in .[test])")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    clipaudit_bin = str(Path(sys.executable).with_name("clipaudit"))
    temp_dir = f"/tmp/rj-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths must fit in 107 bytes
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    work = tmp_path / "work"
    work.mkdir()
    job = write_tiny_job(work, tiny_model, tmp_path / "out", shards=3, per_shard=12,
                         compute="executor: ray, workers: 2, gpus_per_worker: 0, max_retries: 1")
    try:
        common = ["--num-cpus", "1", "--disable-usage-stats"]
        subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard",
                        "true", "--temp-dir", temp_dir, *common], env=env, check=True, capture_output=True, timeout=120)
        # a second node on the same machine: its agents need ports of their own (the head took the defaults)
        ports = [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                          "runtime-env-agent-port", "metrics-export-port")]
        subprocess.run([ray_bin, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                        *ports, *common], env=env, check=True, capture_output=True, timeout=120)
        address = f"http://127.0.0.1:{dash}"
        for _ in range(60):  # the dashboard's job server takes a moment after `ray start` returns
            nodes = subprocess.run([ray_bin, "list", "nodes", "--address", address, "--format", "json"], env=env,
                                   capture_output=True, text=True)
            if nodes.returncode == 0 and len([n for n in json.loads(nodes.stdout) if n["state"] == "ALIVE"]) == 2:
                break
            time.sleep(1)
        else:
            pytest.fail(f"the two-node cluster did not come up: {nodes.stderr[-2000:]}")
        for _ in range(30):  # the head's job agent comes up a little after the dashboard
            submit = subprocess.run([ray_bin, "job", "submit", "--address", address, "--working-dir", str(work), "--",
                                     clipaudit_bin, "run", job.name],
                                    env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in submit.stdout + submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout.lower()
    finally:
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    summary = json.loads((tmp_path / "out" / "_SUMMARY.json").read_text())
    assert summary["shards_done"] == 3 and summary["rows"] == 36 and not summary["shards_failed"]
    local = load_spec(job)
    local = local.model_copy(update={"output": str(tmp_path / "local"),
                                     "compute": local.compute.model_copy(update={"executor": "local"})})
    run_job(local, progress=False)
    assert_same_outputs(tmp_path / "out", tmp_path / "local", OTHER_EXECUTOR_TOL)
