"""An audit submitted through the Ray Jobs API (`ray job submit`) to a two-node Ray cluster
started here with `ray start` on 127.0.0.1 — as on a real cluster, where the job's driver runs
on the head node and the outputs go to shared storage (here: an absolute path on this disk) or
to object storage (here: a moto S3 server on 127.0.0.1).

The cluster is this test's own (its own temp dir and ports, every process of it killed at the
end); the test session's local Ray (``ray_session``) and any other Ray on the machine are left alone."""

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
from helpers import OTHER_EXECUTOR_TOL, assert_same_outputs, moto_s3_server, write_tiny_job

import clipaudit
from clipaudit.app.runner import run_job
from clipaudit.app.jobs import load_job

pytestmark = [pytest.mark.slow, pytest.mark.ray]

JOB_TIMEOUT_S = 150  # the job takes about 30-60 s on 2 cores; a stuck one is reported with its logs


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (the sockets are held until all are picked, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_pids(temp_dir: str) -> list[int]:
    """Processes of this test's cluster: those with a file open under its temp dir (every Ray process
    logs to its session's logs/ folder, the job's driver too), in it (the job's working dir is unpacked
    there), or naming it on their command line. Not the command line alone: the agents rename
    themselves (``ray::DashboardAgent``), and the Ray client server names only addresses."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        proc = Path("/proc", entry)
        try:
            if temp_dir.encode() in (proc / "cmdline").read_bytes() or os.readlink(proc / "cwd").startswith(temp_dir):
                pids.append(int(entry))
                continue
            for fd in (proc / "fd").iterdir():
                try:
                    if os.readlink(fd).startswith(temp_dir):
                        pids.append(int(entry))
                        break
                except OSError:
                    continue
        except OSError:  # gone, or not ours to read
            continue
    return pids


def _kill_cluster(temp_dir: str) -> None:
    """Stop only this test's Ray processes (``ray stop`` would stop the test session's Ray too)."""
    for _ in range(10):  # a raylet may start a worker while its siblings are being killed
        pids = _cluster_pids(temp_dir)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        time.sleep(0.5)


def _logs(temp_dir: str, client, submission_id: str) -> str:
    """What to read when the job did not succeed: its driver's output and the Ray logs that say why."""
    parts = []
    try:
        parts.append("== ray job logs ==\n" + client.get_job_logs(submission_id)[-6000:])
    except Exception as e:  # noqa: BLE001 - diagnostics only
        parts.append(f"== ray job logs: {e!r}")
    for logs in sorted(Path(temp_dir).glob("*/session_latest/logs")):  # one temp dir per node
        for pattern in ("job-driver-*.log", "raylet*.out", "runtime_env_setup-*.log", "runtime_env_agent*.log",
                        "dashboard_agent*.log", "worker-*.err"):
            for f in sorted(logs.glob(pattern)):
                text = f.read_text(errors="replace")
                if text.strip():
                    parts.append(f"== {f.relative_to(temp_dir)} ==\n{text[-2000:]}")
    return "\n".join(parts)[-30000:]


@pytest.fixture(params=["shared-folder", "s3"])
def output(request, tmp_path):
    """Where the job writes: a folder every node sees, or a bucket on a local S3 server (then
    yields the URL and the options; the credentials reach the driver as environment variables)."""
    if request.param == "shared-folder":
        yield {"output": str(tmp_path / "out"), "options": None, "env": {}}
        return
    import boto3

    with moto_s3_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                     region_name="us-east-1").create_bucket(Bucket="cluster-out")
        yield {"output": "s3://cluster-out/audit", "endpoint": endpoint,
               "options": {"endpoint_url": endpoint, "key": "${RJ_S3_KEY}", "secret": "${RJ_S3_SECRET}"},
               "env": {"RJ_S3_KEY": "k", "RJ_S3_SECRET": "s", "CLIPAUDIT_SCRATCH_DIR": str(tmp_path / "scratch")}}


def test_a_job_submitted_to_a_two_node_cluster_completes(tiny_model, tmp_path, output, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    ray_bin = Path(sys.executable).with_name("ray")
    ray_bin = str(ray_bin) if ray_bin.exists() else shutil.which("ray")
    # the job's entrypoint runs in the head's environment: this interpreter's clipaudit, by absolute path,
    # and the code this test imports (a source tree on PYTHONPATH goes to the job, an installed package is there)
    clipaudit_bin = Path(sys.executable).with_name("clipaudit")
    entry = [str(clipaudit_bin)] if clipaudit_bin.exists() else [sys.executable, "-m", "clipaudit.cli"]
    engine = Path(clipaudit.__file__).resolve().parents[1]
    job_env = {} if engine.name in {"site-packages", "dist-packages"} else {"PYTHONPATH": str(engine)}
    job_env.update(output["env"])
    # short: Ray's socket paths must fit in 107 bytes. Each node gets a temp dir of its own, as on separate
    # machines: a worker node started without one shares the head's session dir, and its runtime env agent
    # then deletes and unpacks again the job's working dir under the driver's feet (names.txt: No such file)
    temp_dir = f"/tmp/rj-{uuid.uuid4().hex[:8]}"
    head_tmp, worker_tmp = f"{temp_dir}/h", f"{temp_dir}/w"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    # as on a cluster: shards, names and outputs on storage every node sees ("shared", absolute paths),
    # the job spec in the repository's jobs/ folder that `--working-dir .` uploads
    shared, work, out = tmp_path / "shared", tmp_path / "work", tmp_path / "out"
    shared.mkdir()
    (work / "jobs").mkdir(parents=True)
    # one CPU a node and one a map actor: each node holds one of the two actors, so the map runs on both
    spec = write_tiny_job(shared, tiny_model, out, shards=3, per_shard=12,
                          compute="executor: ray, workers: 2, cpus_per_worker: 1, gpus_per_worker: 0, max_retries: 1, "
                                  "actor_start_timeout_s: 90, progress_interval_s: 5")
    text = spec.read_text()
    assert '"shards/' in text and "names: names.txt" in text
    job = work / "jobs" / "audit.yaml"
    text = text.replace('"shards/', f'"{shared}/shards/').replace("names: names.txt", f"names: {shared}/names.txt")
    if output["options"] is not None:  # the bucket: no shared file system for the outputs
        text = text.replace(f"output: {out}", f"output: {output['output']}")
        text = text.replace('.tar"}', f'.tar", storage_options: {json.dumps(output["options"])}}}')
        assert output["output"] in text and "storage_options" in text
    job.write_text(text)
    # every port either node listens on is its own: the defaults (GCS 6379, dashboard 8265, agent 52365,
    # client server 10001) may be held by another Ray on this machine, and two nodes here cannot share them
    port, dash, client_port, *agent_ports = _free_ports(11)

    def agent_ports_args(ports):
        names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                 "metrics-export-port")
        return [f"--{name}={p}" for name, p in zip(names, ports)]

    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    address = f"http://127.0.0.1:{dash}"
    submission_id = f"clipaudit-{uuid.uuid4().hex[:8]}"
    client = None
    try:
        for args in (["--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                      "--include-dashboard", "true", "--ray-client-server-port", str(client_port),
                      "--temp-dir", head_tmp, *agent_ports_args(agent_ports[:4])],
                     ["--address", f"127.0.0.1:{port}", "--temp-dir", worker_tmp, *agent_ports_args(agent_ports[4:])]):
            started = subprocess.run([ray_bin, "start", *args, *common], env=env, capture_output=True, text=True,
                                     timeout=120)
            assert started.returncode == 0, \
                f"ray start {' '.join(args)}:\n{started.stdout[-2000:]}{started.stderr[-3000:]}"
        deadline = time.monotonic() + 60
        while True:  # the dashboard's job server and the agents come up a moment after `ray start` returns
            try:
                if len([n for n in list_nodes(address=address, timeout=5) if n.state == "ALIVE"]) == 2:
                    client = JobSubmissionClient(address)
                    break
            except Exception:  # noqa: BLE001, S110 - not up yet
                pass
            if time.monotonic() > deadline:
                pytest.fail("the two-node cluster did not come up:\n" + _logs(temp_dir, None, ""))
            time.sleep(1)
        # as in docs/running.md: `ray job submit --working-dir . -- clipaudit run JOB`, here without following
        # the logs (--no-wait) so that a stuck job is reported with its logs instead of hanging the test
        cmd = [ray_bin, "job", "submit", "--address", address, "--submission-id", submission_id, "--no-wait",
               "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": job_env}),
               "--", *entry, "run", "jobs/audit.yaml"]
        for _ in range(30):  # the head's job agent may still be starting: "No available agent to submit job"
            submit = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=120)
            if submit.returncode == 0 or "No available agent" not in submit.stdout + submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while (status := client.get_job_status(submission_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                         JobStatus.STOPPED}:
            if time.monotonic() > deadline:
                pytest.fail(f"the job is still {status} after {JOB_TIMEOUT_S} s:\n"
                            + _logs(temp_dir, client, submission_id))
            time.sleep(1)
        logs = client.get_job_logs(submission_id)
        assert status == JobStatus.SUCCEEDED, f"the job {status}:\n" + _logs(temp_dir, client, submission_id)
        assert "shards" in logs and "query: clipaudit query" in logs, logs[-3000:]  # the summary, the query hint
        # the map actors ran on both nodes (dead actors stay listed, with the node they ran on)
        actors = list_actors(address=address, filters=[("class_name", "=", "_MapWorker")], detail=True, timeout=30)
        assert len(actors) >= 2, actors
        assert len({a.node_id for a in actors}) == 2, [(a.node_id, a.state) for a in actors]
    finally:
        if client is not None:
            try:
                client.stop_job(submission_id)
            except Exception:  # noqa: BLE001, S110 - already finished, or never submitted
                pass
        _kill_cluster(temp_dir)
        left = _cluster_pids(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the test's cluster still running: {left}"
    if output["options"] is not None:  # the bucket as it is, fetched by the test
        from clipaudit.data.storage import url_to_fs

        for k, v in output["env"].items():
            monkeypatch.setenv(k, v)
        fs, root = url_to_fs(output["output"], output["options"])
        out = tmp_path / "store-copy"
        fs.get(f"{root}/", str(out), recursive=True)
        assert not (tmp_path / "out").exists()  # nothing went to a local folder
        assert not list((tmp_path / "scratch").rglob("*.parquet"))  # nor Parquet into a scratch folder
    summary = json.loads((out / "_SUMMARY.json").read_text())
    assert summary["shards_done"] == 3 and summary["rows"] == 36 and not summary["shards_failed"]
    local = load_job(job)
    local = local.model_copy(update={"output": tmp_path / "local",
                                     "compute": local.compute.model_copy(update={"executor": "local"})})
    run_job(local, progress=False)
    assert_same_outputs(out, tmp_path / "local", OTHER_EXECUTOR_TOL)
