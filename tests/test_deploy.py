"""deploy/ (KubeRay RayJob, Kubernetes CronJob) and cluster.yaml (Ray cluster launcher) say what
they must: they are parsed here and checked field by field; cluster.yaml with Ray's own schema."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]  # minute hour day-of-month month day-of-week


def is_cron(schedule: str) -> bool:
    """A five-field cron expression of numbers, ranges, lists, steps and * (no names, no macros)."""
    fields = schedule.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi) in zip(fields, _CRON_RANGES):
        for part in field.split(","):
            m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if not m or (m.group(4) is not None and int(m.group(4)) == 0):
                return False
            if m.group(2) is not None:
                a, b = int(m.group(2)), int(m.group(3) or m.group(2))
                if not lo <= a <= b <= hi:
                    return False
    return True


def test_cron_check_can_fail():
    assert is_cron("0 2 * * *") and is_cron("*/15 0-6 1,15 * 1-5")
    for bad in ("0 2 * *", "61 2 * * *", "0 24 * * *", "0 2 * * 8", "@daily", "0 2 * * MON", "*/0 * * * *"):
        assert not is_cron(bad), bad


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``16Gi``, ``512Mi``, ``2G``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+)([KMGT]i?)?", str(quantity))
    assert m, f"not a memory quantity: {quantity}"
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


def test_memory_quantities_read_as_kubernetes_reads_them():
    assert _bytes("16Gi") == 16 * 2**30 and _bytes("2G") == 2 * 10**9 and _bytes("512") == 512
    with pytest.raises(AssertionError):
        _bytes("lots")


def _nightly_commands(rayjob: dict) -> list[list[str]]:
    """The entrypoint's commands (joined by &&), with $OUT replaced by the value it is given."""
    texts = [t.strip() for t in rayjob["spec"]["entrypoint"].split("&&")]
    out = next((t[len("OUT="):] for t in texts if t.startswith("OUT=")), None)
    return [[out if a == "$OUT" and out else a for a in shlex.split(t)] for t in texts if not t.startswith("OUT=")]


def _nightly_command(rayjob: dict) -> list[str]:
    return _nightly_commands(rayjob)[0]


def test_rayjob_submits_the_nightly_job_on_gpu_workers_and_cleans_up():
    rayjob = _one(_docs(ROOT / "deploy" / "rayjob.yaml"), "RayJob")
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["metadata"].get("generateName"), "each night's RayJob needs its own name (kubectl create)"
    spec = rayjob["spec"]
    argv = _nightly_command(rayjob)
    assert argv[:3] == ["clipaudit", "run", "jobs/nightly.yaml"], argv
    # the map step on the GPU workers, then the reduce step of the same output once they are released
    assert "--map-only" in argv
    [reduce] = _nightly_commands(rayjob)[1:]
    assert reduce == ["clipaudit", "reduce", argv[argv.index("--output") + 1]], reduce
    assert (ROOT / argv[2]).is_file()
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/app"  # where the image keeps jobs/
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] < 24 * 3600  # a night ends before the next one starts

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})  # a CPU head
    # that runs no Ray work: the driver and the reduce step keep its CPUs
    assert str(cluster["headGroupSpec"]["rayStartParams"].get("num-cpus")) == "0"
    # shared memory is RAM the pod is charged for: bounded, below the container's memory limit
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        limit = _bytes(pod["containers"][0]["resources"]["limits"]["memory"])
        for v in pod["volumes"]:
            if v.get("emptyDir", {}).get("medium") == "Memory":
                assert "sizeLimit" in v["emptyDir"], v
                assert _bytes(v["emptyDir"]["sizeLimit"]) < limit, (v, limit)
    groups = cluster["workerGroupSpecs"]
    assert groups, "no worker group"
    # GPU workers come and go with the job's request: autoscaling, none kept while idle, room for the job's actors
    assert cluster["enableInTreeAutoscaling"] is True
    workers = yaml.safe_load((ROOT / "jobs" / "nightly.yaml").read_text())["compute"]["workers"]
    assert all(g["minReplicas"] == 0 for g in groups) and sum(g["maxReplicas"] for g in groups) >= workers
    for group in groups:
        worker = group["template"]["spec"]["containers"][0]
        for kind in ("requests", "limits"):
            assert int(worker["resources"][kind]["nvidia.com/gpu"]) >= 1, f"{group['groupName']} {kind}"

    # the output folder (the nightly spec's default and the dated --output) is on the volume every pod mounts
    output = argv[argv.index("--output") + 1]
    job_output = yaml.safe_load((ROOT / "jobs" / "nightly.yaml").read_text())["output"]
    for pod in [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups]:
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        shared = [path for name, path in mounts.items() if claims.get(name)]
        assert any(output.startswith(p + "/") and job_output.startswith(p + "/") for p in shared), (output, shared)


def test_cronjob_creates_the_rayjob_nightly_with_the_rights_it_needs():
    docs = _docs(ROOT / "deploy" / "cronjob.yaml")
    cron = _one(docs, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert is_cron(spec["schedule"]), spec["schedule"]
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = container["command"]
    # clipaudit's own image (the RayJob's), which creates the object as `kubectl create -f` does
    rayjob = yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container["image"] == head["image"]
    assert command[:3] == ["python", "-m", "clipaudit.app.kube_submit"], command
    manifest = Path(command[3])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(manifest.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "configMap" in volume and manifest.name == "rayjob.yaml"
    assert "--from-file=rayjob.yaml=deploy/rayjob.yaml" in (ROOT / "deploy" / "cronjob.yaml").read_text()

    account = pod["serviceAccountName"]
    assert _one(docs, "ServiceAccount")["metadata"]["name"] == account
    role = _one(docs, "Role")
    binding = _one(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"]
               for r in role["rules"])


def test_the_cron_pod_creates_the_rayjob_as_kubectl_create_would(tmp_path, monkeypatch):
    """kube_submit POSTs the manifest (generateName kept) to the RayJob collection of the pod's
    namespace with the service account's token, on a local HTTP server standing for the API server."""
    import http.server
    import json
    import threading

    from clipaudit.app.kube_submit import create

    seen = {}

    class Api(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 — the stdlib's name
            seen["path"], seen["auth"] = self.path, self.headers["Authorization"]
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer = {**seen["body"], "metadata": {**seen["body"]["metadata"], "name": "clipaudit-nightly-x7k2p"}}
            code = 201 if self.path.endswith("/rayjobs") else 404
            self.send_response(code)
            self.end_headers()
            self.wfile.write(json.dumps(answer).encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        manifest = yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())
        api = f"http://127.0.0.1:{server.server_port}"
        created = create(manifest, api, "the-token", "audits")
        assert seen["path"] == "/apis/ray.io/v1/namespaces/audits/rayjobs"
        assert seen["auth"] == "Bearer the-token" and seen["body"] == manifest
        assert created["metadata"]["name"] == "clipaudit-nightly-x7k2p"
        with pytest.raises(RuntimeError, match="creating the ConfigMap failed: HTTP 404"):
            create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, api, "t", "audits")
    finally:
        server.shutdown()


def test_kubernetes_manifests_pass_the_kubernetes_schemas():
    """The built-in kinds of deploy/ against the Kubernetes API's own schemas (kubernetes-validate,
    offline); the RayJob is a custom resource, checked field by field above."""
    import kubernetes_validate

    version = "1.30"
    for path in (ROOT / "deploy").glob("*.yaml"):
        for doc in _docs(path):
            if doc["apiVersion"].startswith("ray.io/"):
                continue
            kubernetes_validate.validate(doc, version, strict=True)
    bad = _one(_docs(ROOT / "deploy" / "cronjob.yaml"), "CronJob")
    bad["spec"]["concurrencyPolicie"] = bad["spec"].pop("concurrencyPolicy")  # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # aws: fills defaults locally, no cloud call
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_own_schema():
    prepared = _validate(_cluster())
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no worker type declares GPUs"
    for name, t in gpu_types.items():
        # min_workers 0: the job asks the autoscaler for its GPUs (tests/app/test_plan.py checks the request)
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name
        gpu_memory = GPU_MEMORY_GB[t["node_config"]["InstanceType"]]
        assert gpu_memory >= 80, f"{name}: {gpu_memory} GB GPUs cannot hold ViT-L-14 beside a 10^6-name state"
        assert t["resources"]["GPU"] == GPU_COUNT[t["node_config"]["InstanceType"]], name
    assert 1 <= prepared["idle_timeout_minutes"] <= 60
    job = yaml.safe_load((ROOT / "jobs" / "laion-identities.yaml").read_text())["compute"]
    assert job["gpus_per_worker"] > 0 and job.get("device") != "cpu"  # the job uses the GPU type


#: GPU memory (GB) and GPUs per instance of the AWS types cluster.yaml may name (AWS's instance pages)
GPU_MEMORY_GB = {"g5.2xlarge": 24, "g6e.2xlarge": 48, "p4d.24xlarge": 40, "p4de.24xlarge": 80,
                 "p5.48xlarge": 80}
GPU_COUNT = {"g5.2xlarge": 1, "g6e.2xlarge": 1, "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8}


def test_cluster_yaml_installs_the_shipped_wheel_with_its_backends():
    config = _cluster()
    mounts = config["file_mounts"]
    remote, local = next((r, lo) for r, lo in mounts.items() if lo.rstrip("/") in ("./dist", "dist"))
    install = [c for c in config["setup_commands"] if "clipaudit" in c]
    assert install and remote.replace("/home/ubuntu", "~") in install[0] and ".whl" in install[0]
    # s3fs & co.: the jobs read shards and names from object storage; ray[default]: `ray job submit`
    assert "[remote,cluster]" in install[0]
    assert "/dist/" in (ROOT / ".gitignore").read_text().split()  # built wheels stay out of git


@pytest.mark.parametrize("break_it, message", [
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workerz=0), "'min_workerz' was unexpected"),
    (lambda c: c.update(idle_timeout_minutes="ten"), "'ten' is not of type 'number'"),
    (lambda c: c.update(head_node_type="no_such_type"), "must be one of `available_node_types`"),
])
def test_the_schema_check_can_fail(break_it, message):
    config = _cluster()
    break_it(config)
    import jsonschema

    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        _validate(config)


def test_the_image_matches_the_rayjob_and_installs_the_wheel_with_gpu_faiss():
    """deploy/Dockerfile builds the image rayjob.yaml runs: the same Ray version, the shipped wheel
    with the object-storage and GPU extras (faiss-gpu installed last), the job specs at /app/jobs."""
    import tomllib

    text = (ROOT / "deploy" / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    base = re.fullmatch(r"FROM rayproject/ray:([\d.]+)-py\d+-(cu\d+)", lines[0])
    rayjob = yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())
    assert base and base.group(1) == rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    # torch pinned, from PyTorch's index for the base image's CUDA, before the wheel could pull another
    torch = re.search(r"--index-url https://download\.pytorch\.org/whl/(cu\d+)[\s\\]+\"torch==[\d.]+\"", text)
    assert torch and torch.group(1) == base.group(2), "torch is not pinned to the base image's CUDA"
    assert re.search(r"\"torchvision==[\d.]+\"", text)
    assert text.index("torch==") < text.index("COPY dist/")
    run = text[text.index("COPY dist/"):]
    assert ".whl" in run and "[remote,gpu]" in run
    assert run.index("[remote,gpu]") < run.index("--force-reinstall --no-deps \"faiss-gpu")
    assert "COPY jobs/ /app/jobs/" in lines
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert any(dep.startswith("faiss-gpu>=") for dep in gpu)
