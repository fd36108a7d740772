"""The dry run's plan: images counted from local tar headers, actors and GPUs from the spec, a
time estimate only from a bench record of the same model, URL inputs listed as unchecked."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from clipaudit.cli import main
from clipaudit.app.plan import count_images, make_plan, unchecked_inputs
from clipaudit.spec import SpecError
from clipaudit.app.jobs import load_job
from clipaudit.app.resolve import map_fingerprint


def _tar(path: Path, keys: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext, data in (("jpg", b"\xff\xd8 not decoded"), ("json", b'{"identity": "Ann"}')):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _job(root: Path, shards: str, compute: str = "{executor: ray, workers: 2}", names: str = "names.txt") -> Path:
    (root / "names.txt").write_text("Ann\n")
    job = root / "job.yaml"
    job.write_text(f"model: {{name: ViT-B-32}}\ndata: {{shards: {shards}}}\nnames: {names}\n"
                   f"compute: {compute}\noutput: out\n")
    return job


def test_images_are_counted_from_tar_headers_empty_and_broken_tars_included(tmp_path):
    a = _tar(tmp_path / "a.tar", ["k1", "k2", "k3"])
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar at all" * 64)
    assert count_images([str(a), str(empty)]) == (3, "3 (from tar headers)")
    n, text = count_images([str(a), str(broken)])
    assert n == 3 and "1 not readable as tar, counted as 0" in text
    assert count_images([str(a), "s3://b/x.tar"]) == (
        None, "unknown (1 of 2 shards on object storage, not read by a dry run)")


def test_many_shards_are_sampled_and_extrapolated(tmp_path, monkeypatch):
    import clipaudit.app.plan as plan

    monkeypatch.setattr(plan, "COUNT_AT_MOST", 2)
    shards = [str(_tar(tmp_path / f"{i}.tar", [f"k{j}" for j in range(2)])) for i in range(4)]
    n, text = count_images(shards)
    assert n == 8 and text.startswith("≈ 8 (extrapolated from the tar headers of 2 of 4 shards")


CLUSTER = "ray_address: '127.0.0.1:6379'"  # a Ray cluster: its GPUs are known when the job runs there


def test_estimate_needs_a_bench_record_of_the_same_model(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _tar(tmp_path / "a.tar", [f"k{i}" for i in range(24)])
    job = _job(tmp_path, "a.tar")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"model": "ViT-B-32", "precision": "float16", "attacks": "default",
                                 "device": "cuda", "e2e_images_per_s": 0.01}))
    assert main(["run", str(job), "--dry-run", "--bench", str(bench)]) == 0
    out = capsys.readouterr().out
    assert "images: 24 (from tar headers)" in out
    assert "actors: 1 (compute.workers = 2, at most one per shard left, on a local Ray on this machine)" in out
    assert "GPUs: 1 (1 per actor)" in out
    # 24 images / 0.01 images/s on one actor = 2400 s
    assert "estimated time: 40 min on 1 actor(s) at 0.01 images/s each (cuda, float16, attacks default)" in out

    # sized for a deadline: 2400 s of work per actor within 0.25 h (900 s) needs 3 actors of 1 GPU
    assert main(["run", str(job), "--dry-run", "--bench", str(bench), "--deadline-h", "0.25"]) == 0
    assert ("sized for the deadline: 3 actor(s), 3 GPU(s) map 24 images within 0.25 h at 0.01 images/s each: "
            "compute.workers: 3;") in capsys.readouterr().out
    assert main(["run", str(job), "--dry-run", "--deadline-h", "2"]) == 2
    assert "--deadline-h sizes the map step from a benched rate" in capsys.readouterr().err

    assert main(["run", str(job), "--dry-run"]) == 0
    assert "estimated time: none (no bench figure" in capsys.readouterr().out
    bench.write_text(json.dumps({"model": "ViT-L-14", "e2e_images_per_s": 10}))
    assert main(["run", str(job), "--dry-run", "--bench", str(bench)]) == 0
    assert "estimated time: none (the bench figure is for ViT-L-14, this job runs ViT-B-32)" in capsys.readouterr().out
    bench.write_text("{}")
    assert main(["run", str(job), "--dry-run", "--bench", str(bench)]) == 2
    assert "--bench: not a `clipaudit bench` record" in capsys.readouterr().err
    assert main(["run", str(job), "--bench", str(bench)]) == 2  # a time estimate is a dry-run matter
    assert "--bench is read by --dry-run only" in capsys.readouterr().err


def test_actors_and_gpus_unknown_until_the_cluster_is_there(tmp_path):
    _tar(tmp_path / "a.tar", ["k"])
    spec = load_job(_job(tmp_path, "a.tar", compute=f"{{executor: ray, gpus_per_worker: 0.5, {CLUSTER}}}"))
    plan = make_plan(spec, done=0)
    assert plan.actors is None and "one per 0.5 GPU(s) of the cluster" in plan.actors_note
    assert plan.gpus is None
    local = make_plan(load_job(_job(tmp_path, "a.tar", compute="{executor: local, device: cpu}")), done=0)
    assert (local.actors, local.gpus) == (1, 0.0)


def test_a_name_pool_url_is_read_by_the_run_and_listed_unchecked_by_the_dry_run(tmp_path, capsys):
    import fsspec

    from clipaudit.data.names import NamePoolError, load_name_pool

    content = b"Ann Example\nBo  Example\n\nAnn Example\n"
    with fsspec.open("memory://pools/names.txt", "wb") as f:
        f.write(content)
    _tar(tmp_path / "a.tar", ["k"])
    job = _job(tmp_path, "a.tar", names="memory://pools/names.txt")
    spec = load_job(job)
    assert spec.names == "memory://pools/names.txt"  # a URL is kept as given, not made a path
    assert load_name_pool(spec.names) == ["Ann Example", "Bo Example"]
    assert map_fingerprint(spec)["names_sha256"] == hashlib.sha256(content).hexdigest()
    assert [(u.key, u.value) for u in unchecked_inputs(spec)] == [("names", "memory://pools/names.txt")]
    assert main(["run", str(job), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "  names: memory://pools/names.txt — on object storage, not contacted by a dry run" in out
    assert "map hash: not computed (the name pool is on object storage)" in out
    with pytest.raises(NamePoolError, match="names: object not found: memory://pools/missing.txt"):
        load_name_pool("memory://pools/missing.txt")


def test_reduce_reads_a_name_pool_url(tmp_path):
    import fsspec

    from clipaudit.reduce.identities import name_pool

    with fsspec.open("memory://pools/reduce.txt", "wb") as f:
        f.write(b"Ann\n")
    assert name_pool("memory://pools/reduce.txt") == {"Ann"}
    assert name_pool(tmp_path / "absent.txt") is None


def test_weights_from_a_hub_repo_are_unchecked_and_the_name_is_not_judged(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tar(tmp_path / "a.tar", ["k"])
    job = _job(tmp_path, "a.tar")
    job.write_text(job.read_text().replace("model: {name: ViT-B-32}",
                                           "model: {name: my-arch, pretrained: 'hf-hub:org/repo'}"))
    [u] = unchecked_inputs(load_job(job))
    assert (u.key, u.value) == ("model.pretrained", "hf-hub:org/repo")
    assert u.reason.startswith("Hugging Face Hub weights, not in the local Hugging Face cache (org/repo (")
    assert u.reason.endswith("HF_HUB_OFFLINE is set, so a run on this machine stops at once (download them once "
                             "with network, or use a local checkpoint)")
    job.write_text(job.read_text().replace("pretrained: 'hf-hub:org/repo'", "pretrained: null"))
    with pytest.raises(SpecError, match="model.name: unknown model 'my-arch'"):
        unchecked_inputs(load_job(job))


def test_on_a_machine_without_a_gpu_the_dry_run_describes_the_cpu_run(tmp_path, capsys, monkeypatch):
    """A job for a local Ray with device auto: no GPU line about 'every GPU of the cluster'."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _tar(tmp_path / "a.tar", ["k"])
    _tar(tmp_path / "b.tar", ["k"])
    _tar(tmp_path / "c.tar", ["k"])
    job = _job(tmp_path, "'{a,b,c}.tar'", compute="{executor: ray}")
    assert main(["run", str(job), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "actors: 2 (a local Ray on this machine: CPU actors of 0.5 CPU each)" in out
    assert "GPUs: 0 (this machine has no GPU: CPU actors)" in out
    assert "numerics: device cpu, precision fp32" in out
    assert "cluster" not in out


def test_device_cuda_without_a_gpu_is_an_error_at_dry_run_and_run(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _tar(tmp_path / "a.tar", ["k"])
    job = _job(tmp_path, "a.tar", compute="{executor: local, device: cuda}")
    for argv in (["run", str(job), "--dry-run"], ["run", str(job)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "compute.device: cuda, but this machine has no GPU" in err[0], err
    assert not (tmp_path / "out").exists()  # stopped before anything was written


def test_hub_weights_that_cannot_be_downloaded_fail_at_once_in_one_line(tmp_path):
    """Offline (HF_HUB_OFFLINE, or a hub that does not answer) and not in the local cache: `run`
    stops before any work with one line; `--dry-run` says the weights are not in the cache."""
    import os
    import subprocess
    import sys
    import time

    from helpers import free_port

    _tar(tmp_path / "a.tar", ["k"])
    job = _job(tmp_path, "a.tar", compute="{executor: local}")
    job.write_text(job.read_text().replace("model: {name: ViT-B-32}",
                                           "model: {name: ViT-B-32, pretrained: laion2b_s34b_b79k}"))
    base = {**os.environ, "HF_HOME": str(tmp_path / "hf-cache")}
    for env, why in (({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
                     ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, "cannot be reached")):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "clipaudit.cli", "run", str(job)], capture_output=True, text=True,
                           env={**base, **env}, timeout=300)
        took = time.monotonic() - t0
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "are not in the local Hugging Face cache" in lines[0] and why in lines[0], lines
        assert "Retry" not in p.stderr and took < 60
        assert not (tmp_path / "out").exists()
    p = subprocess.run([sys.executable, "-m", "clipaudit.cli", "run", str(job), "--dry-run"], capture_output=True,
                       text=True, env={**base, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr
    assert ("model.pretrained: ViT-B-32 laion2b_s34b_b79k — OpenCLIP zoo weights, not in the local Hugging Face "
            "cache") in p.stdout


class _FakeCluster:
    """A Ray cluster's resources, and the autoscaler requests it got (GPU nodes join on request
    when ``joins``)."""

    def __init__(self, joins: bool) -> None:
        self.resources, self.requests, self.joins = {"CPU": 4.0}, [], joins

    def cluster_resources(self):
        return dict(self.resources)

    def request(self, bundles):
        self.requests.append(bundles)
        if bundles and self.joins:
            self.resources["GPU"] = sum(b["GPU"] for b in bundles)


@pytest.mark.parametrize("joins", [True, False], ids=["gpu-nodes-join", "no-gpu-node-starts"])
def test_a_cluster_is_asked_for_the_gpus_and_cuda_without_them_never_falls_back(tmp_path, monkeypatch, caplog,
                                                                                  joins):
    from clipaudit.app.resolve import detect_device_type
    from clipaudit.executors import ray as ray_executor

    cluster = _FakeCluster(joins)
    monkeypatch.setattr(ray_executor, "_ray", lambda: cluster)
    monkeypatch.setattr(ray_executor, "ensure_ray", lambda address: False)
    monkeypatch.setattr(ray_executor, "_request_resources", cluster.request)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster, not this machine's own Ray
    _tar(tmp_path / "a.tar", ["k"])
    job = _job(tmp_path, "a.tar", compute="{executor: ray, workers: 3, cpus_per_worker: 4, gpus_per_worker: 1, "
                                          "device: cuda, gpu_wait_s: 0.3}")
    spec = load_job(job)
    assert detect_device_type(spec, wait=False) == "cuda" and cluster.requests == []  # a dry run asks nothing
    if joins:
        assert detect_device_type(spec) == "cuda"
    else:
        with pytest.raises(SpecError, match=r"compute.device: cuda, but the Ray cluster has no GPU: none joined within "
                                            r"compute.gpu_wait_s = 0.3 s of asking the autoscaler for 3 × "):
            detect_device_type(spec)
        auto = spec.model_copy(update={"compute": spec.compute.model_copy(update={"device": "auto"})})
        assert detect_device_type(auto) == "cpu" and "runs on CPU" in caplog.text  # auto says so, loudly
    assert cluster.requests[0] == [{"GPU": 1.0, "CPU": 4.0}] * 3  # one bundle per map actor
    ray_executor.release_gpu_request()  # after the map step: the nodes may go when idle
    assert cluster.requests[-1] == []
    ray_executor.release_gpu_request()
    assert cluster.requests.count([]) == 1  # withdrawn once


def test_a_ray_this_process_started_is_this_machine_and_asks_no_autoscaler(tmp_path, monkeypatch):
    """A local Ray (the demo's, the tests'): its GPUs are the machine's; nothing is requested or waited for."""
    import sys

    from clipaudit.app.resolve import detect_device_type
    from clipaudit.executors import ray as ray_executor

    cluster = _FakeCluster(joins=True)
    cluster.is_initialized = lambda: True
    monkeypatch.setitem(sys.modules, "ray", cluster)  # a Ray already running in this process
    monkeypatch.setattr(ray_executor, "_ray", lambda: cluster)
    monkeypatch.setattr(ray_executor, "ensure_ray", lambda address: False)
    monkeypatch.setattr(ray_executor, "_request_resources", cluster.request)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _tar(tmp_path / "a.tar", ["k"])
    spec = load_job(_job(tmp_path, "a.tar", compute="{executor: ray, workers: 2, gpu_wait_s: 600}"))
    assert detect_device_type(spec) == "cpu" and cluster.requests == []


def test_the_dry_run_counts_forward_passes_per_image_by_attack(tmp_path, capsys):
    """Each attack's views, crops and masks, from its own registry entry; a sampled one says so."""
    _tar(tmp_path / "a.tar", ["k"])
    job = _job(tmp_path, "a.tar", compute="{executor: local}")
    job.write_text(job.read_text() + "attacks: {idia: {}, encodermi: {views: 10}, mim: {}, "
                                      "partcrop: {crops: 32, sample: {per_identity: 2}}}\n")
    assert main(["run", str(job), "--dry-run"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("forward passes per image:"))
    assert line == ("forward passes per image: 1 (the embedding) + encodermi 10 + partcrop 32 on a sample (up to 2 "
                    "image(s) per identity and shard) + mim 3; 14 per image scored by every attack")
