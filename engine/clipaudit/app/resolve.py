"""What a job spec means on this machine or cluster: the device it runs on, the precision and
name index that follow, and the fingerprints (model files, name pool, plugins) of the resume
hash. The spec itself (:mod:`clipaudit.spec`) only describes the job; everything here probes
hardware or reads files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from clipaudit.contract.registry import available
from clipaudit.core.hashing import sha256_file
from clipaudit.data.names import load_name_pool, read_pool_bytes
from clipaudit.data.urls import is_url
from clipaudit.executors.ray import cluster_gpus, cluster_resources, gpu_bundles, named_cluster
from clipaudit.model.files import model_files
from clipaudit.model.name_index import ivf_params, resolve_backend
from clipaudit.spec import JobSpec, SpecError, map_output_format

log = logging.getLogger(__name__)

_NAME_COUNT: dict[str, int] = {}  # names file sha256 → distinct names


def detect_device_type(spec: JobSpec, wait: bool = True) -> str:
    """``cuda`` or ``cpu``: where the map step of ``spec`` runs. An explicit ``compute.device``
    decides; with ``auto``, the GPUs of the Ray cluster (Ray executor) or of this machine."""
    import torch

    c = spec.compute
    if c.executor == "ray" and c.device != "cpu" and c.gpus_per_worker > 0:
        if not wait and c.device != "auto":  # a dry run: the GPUs are asked for when the job runs
            return torch.device(c.device).type
        gpus = cluster_gpus(c.ray_address, c if wait else None)  # on a cluster: asked of the autoscaler, waited for
        if gpus > 0:
            return "cuda"
        if c.device != "auto":  # cuda never falls back to the CPU
            bundles = gpu_bundles(c)
            raise SpecError(f"compute.device: {c.device}, but the Ray cluster has no GPU: none joined within "
                            f"compute.gpu_wait_s = {c.gpu_wait_s:g} s of asking the autoscaler for {len(bundles)} "
                            f"× {bundles[0]} (cluster resources: {cluster_resources()}); check that a node type "
                            "with GPUs can start, or use device: auto or cpu")
        if named_cluster(c.ray_address):  # a cluster, not this machine's own Ray
            log.warning("compute.device: auto and the Ray cluster has no GPU after %g s: the map step runs on CPU",
                        c.gpu_wait_s)
        return "cpu"
    if c.device != "auto":
        return torch.device(c.device).type
    if c.executor == "ray":
        return "cpu"  # no GPU asked for (gpus_per_worker: 0)
    return "cuda" if torch.cuda.is_available() else "cpu"


def names_sha256(names: str | Path, storage_options: dict[str, Any] | None = None) -> str:
    """Hex sha256 of the name pool's content; a pool on object storage is read to hash it."""
    if isinstance(names, str) and is_url(names):
        return hashlib.sha256(read_pool_bytes(names, storage_options)).hexdigest()
    return sha256_file(names)


def name_count(spec: JobSpec) -> int:
    """How many distinct names the pool holds (read once per process and file state)."""
    key = names_sha256(spec.names, spec.data.storage_options)
    if key not in _NAME_COUNT:
        _NAME_COUNT[key] = len(load_name_pool(spec.names, spec.data.storage_options))
    return _NAME_COUNT[key]


def numerics(spec: JobSpec, device_type: str | None = None, read_pool: bool = True, wait: bool = True
             ) -> dict[str, str]:
    """What the hardware decides about the numbers: the device type, the model's precision
    and the name-index kind, with ``auto``/unset resolved as the map step resolves them (on
    ``device_type``, default: this machine). They change scores slightly, so they enter the
    resume hash: a GPU run is never resumed on a CPU, or the reverse, without ``--force``.
    ``read_pool=False``: the pool is not read, and an index that depends on its size is reported as such."""
    if device_type is None:
        device_type = detect_device_type(spec, wait)
    precision = spec.model.precision or ("fp16" if device_type == "cuda" else "fp32")
    if device_type == "cpu" and precision == "fp16":
        precision = "fp32"  # the model runs fp32 on a CPU (load_model warns)
    index = spec.compute.index
    if not read_pool and index in ("auto", "faiss-ivf"):
        index += " (decided by the pool's size when it runs)"
    elif index == "auto":
        index = resolve_backend(index, device_type, name_count(spec))
    if index == "faiss-ivf":
        index += "(lists=%d,probe=%d)" % ivf_params(name_count(spec))
    decode = spec.compute.decode if spec.compute.decode != "auto" else ("gpu" if device_type == "cuda" else "cpu")
    return {"device": device_type, "precision": precision, "index": index, "decode": decode}


def pinned(spec: JobSpec, device_type: str) -> JobSpec:
    """``spec`` with ``auto`` device, unset precision and ``auto`` index made explicit for
    ``device_type``, so every worker computes what the resume hash says."""
    n = numerics(spec, device_type)
    device = spec.compute.device if spec.compute.device != "auto" else n["device"]
    return spec.model_copy(update={
        "model": spec.model.model_copy(update={"precision": n["precision"]}),
        "compute": spec.compute.model_copy(update={"device": device, "index": n["index"].split("(")[0],
                                                   "decode": n["decode"]}),
    })


def map_fingerprint(spec: JobSpec, wait: bool = True) -> dict[str, Any]:
    """Everything that changes per-sample outputs (not reduce-only attack parameters such
    as a vote's threshold, not labels, calibration or compute). ``wait=False`` (a dry run): a
    cluster's GPUs are counted as they are, never asked of the autoscaler."""
    enabled = spec.attacks.enabled()
    attacks = {a.name: None if a.name not in enabled else a.map_fingerprint(getattr(spec.attacks, a.name))
               for a in available(spec.plugins)}
    samples = any(getattr(getattr(spec.attacks, name), "sample", None) for name in enabled)
    # a sampling attack always scores the labelled and control units: those files then change map outputs
    keeps = {key: None if path is None else names_sha256(path, spec.data.storage_options)
             for key, path in (("labels", spec.labels), ("controls", spec.calibration.controls))} if samples else None
    return {
        **({"sample_keeps": keeps} if samples else {}),
        "model": spec.model.model_dump(exclude={"precision"}),
        "model_files": model_files(spec),
        "numerics": numerics(spec, wait=wait),
        "data": spec.data.model_dump(exclude={"storage_options"}),  # how to reach the data, not what it is
        "names_sha256": names_sha256(spec.names, spec.data.storage_options),
        **attacks,
        "plugins": {ref: sha256_file(ref) if ref.endswith(".py") else ref for ref in spec.plugins},
        "seed": spec.seed,
        "store_embeddings": spec.store_embeddings,
        "output_format": map_output_format(enabled),
    }


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """The resume hash of a :func:`map_fingerprint` (a digest of it)."""
    blob = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def map_hash(spec: JobSpec) -> str:
    """The resume hash of ``spec``. Its fingerprint reads the name pool and hashes the model
    files: where the fingerprint is needed too, compute it once and use :func:`fingerprint_hash`."""
    return fingerprint_hash(map_fingerprint(spec))
