"""Run a job on a 3-node Ray cluster started here, and remove a worker node mid-job.

Used by test_faults.py in a subprocess (its own Ray, apart from the test session's).
Usage: python node_loss_job.py JOB.yaml OUTPUT REPORT.json
Each worker node advertises one ``accelerator_slot`` (a stand-in for a GPU), so the pool
holds one map actor per node; the head node has none.
"""

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from clipaudit.app.runner import run_job  # noqa: E402
from clipaudit.app.jobs import load_job  # noqa: E402


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def lose(cluster, node) -> None:
    """A machine lost at once: its worker processes and its raylet die together (removing the
    raylet alone lets a worker finish its task before it notices)."""
    raylet = node.all_processes["raylet"][0].process.pid
    for pid in _children(raylet):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)


def main(job: str, output: str, report_path: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, resources={"accelerator_slot": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    spec = load_job(job)
    spec = spec.model_copy(update={"output": Path(output)})
    samples = Path(output) / "samples"
    markers_dir, tmp_dir = Path(output) / "_markers", Path(output) / "_tmp"
    event: dict = {}
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("clipaudit.executors.ray").addHandler(handler)

    def remove_a_node_mid_job() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            markers = list(markers_dir.glob("*.done.json")) if markers_dir.is_dir() else []
            # sample part temp files only: a marker's temp file (fsynced, so it lives a while) is not a shard in flight
            writing = list(tmp_dir.glob("samples.*.parquet.tmp-*")) if tmp_dir.is_dir() else []
            # a shard finished, both actors are mid-shard, and shards remain after these two (near the end of
            # the job both in-flight shards may be committing already, and a node lost then interrupts nothing)
            if 1 <= len(markers) <= 3 and len(writing) == 2:
                lose(cluster, workers[1])
                event.update(markers_before=len(markers), writing=len(writing), at=time.time())
                return
            time.sleep(0.02)

    killer = threading.Thread(target=remove_a_node_mid_job)
    killer.start()
    report = run_job(spec, progress=False)
    killer.join()
    stale = [p.name for p in samples.iterdir() if not p.name.endswith(".parquet")] + [p.name for p in tmp_dir.iterdir()]
    Path(report_path).write_text(json.dumps({
        "event": event, "ok": report.ok, "summary": report.summary, "stale_temps": stale,
        "executor_warnings": warnings,
    }))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
