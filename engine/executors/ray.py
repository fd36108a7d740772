"""Ray executor: a pool of map actors (one per GPU, or fractional CPUs), shards handed
out dynamically, bounded retries, dead actors restarted by Ray.

The per-job shared state (name-pool text embeddings) is computed once by a Ray task with
a worker's resources, put in the object store, and passed to every actor's constructor —
so an actor that Ray restarts after a crash gets it again without recomputation.
Actors write their shard's parts and marker themselves; the driver only keeps score.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any

from ..outputs import OutputLayout
from ..spec import JobSpec
from .base import MapResult, Progress, ShardFailure
from .shared import load_or_compute_shared

log = logging.getLogger(__name__)


def _ray():
    import ray  # imported lazily: the local executor and reduce never need it

    return ray


class _MapWorker:
    """Ray actor body: one model per actor, one shard per call."""

    def __init__(self, spec_json: dict, output_root: str, shared: dict[str, Any]) -> None:
        from pathlib import Path

        from ..mapper import ShardMapper

        spec = JobSpec.model_validate(spec_json)
        self.mapper = ShardMapper(spec, OutputLayout(Path(output_root)))
        self.mapper.setup(shared)

    def map_shard(self, shard: str) -> dict:
        return self.mapper.map_shard(shard).to_dict()

    def pid(self) -> int:
        return os.getpid()


def _compute_shared(spec_json: dict, output_root: str) -> dict[str, Any]:
    from pathlib import Path

    from ..mapper import ShardMapper

    spec = JobSpec.model_validate(spec_json)
    layout = OutputLayout(Path(output_root))
    mapper = ShardMapper(spec, layout)
    try:
        return load_or_compute_shared(layout, spec, mapper.compute_shared)
    finally:
        mapper.close()


def ensure_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it."""
    ray = _ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)
    return True


class RayExecutor:
    """Maps shards on a pool of Ray actors."""

    def _pool_shape(self, spec: JobSpec) -> tuple[int, dict[str, float]]:
        ray = _ray()
        gpus = ray.cluster_resources().get("GPU", 0.0)
        c = spec.compute
        if gpus > 0 and c.gpus_per_worker > 0 and c.device != "cpu":
            n = c.workers or max(1, int(gpus // c.gpus_per_worker))
            return n, {"num_gpus": c.gpus_per_worker, "num_cpus": c.cpus_per_worker}
        return c.workers or 2, {"num_cpus": c.cpus_per_worker, "num_gpus": 0}

    def run(self, spec: JobSpec, layout: OutputLayout, shards: list[str], progress: bool = True) -> MapResult:
        t0 = time.perf_counter()
        result = MapResult()
        if not shards:
            return result
        ray = _ray()
        started = ensure_ray(spec.compute.ray_address)
        try:
            self._run(ray, spec, layout, shards, progress, result)
        finally:
            if started:
                ray.shutdown()
        result.seconds = time.perf_counter() - t0
        return result

    def _run(self, ray, spec: JobSpec, layout: OutputLayout, shards: list[str], progress: bool, result: MapResult) -> None:
        n_workers, resources = self._pool_shape(spec)
        n_workers = min(n_workers, len(shards))
        spec_json = spec.to_json()
        root = str(layout.root.resolve())
        shared = ray.remote(_compute_shared).options(**resources, max_retries=spec.compute.max_retries)
        shared_ref = shared.remote(spec_json, root)
        ray.get(shared_ref)  # fail early (e.g. a model that cannot load) before starting the pool
        actor_cls = ray.remote(_MapWorker).options(**resources, max_restarts=0, max_task_retries=0)
        new_actor = lambda: actor_cls.remote(spec_json, root, shared_ref)  # noqa: E731
        actors = [new_actor() for _ in range(n_workers)]
        log.info("map: %d shards on %d actors (%s)", len(shards), n_workers, resources)

        todo = deque(shards)
        attempts: dict[str, int] = {s: 0 for s in shards}
        idle = deque(actors)
        inflight: dict[Any, tuple[str, Any]] = {}
        bar = Progress(len(shards), progress)
        try:
            while todo or inflight:
                while todo and idle:
                    shard, actor = todo.popleft(), idle.popleft()
                    attempts[shard] += 1
                    inflight[actor.map_shard.remote(shard)] = (shard, actor)
                ready, _ = ray.wait(list(inflight), num_returns=1)
                ref = ready[0]
                shard, actor = inflight.pop(ref)
                try:
                    stats = ray.get(ref)
                except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                    if isinstance(e, ray.exceptions.RayActorError) and not isinstance(e, ray.exceptions.RayTaskError):
                        log.warning("map actor died while on %s; starting a replacement", shard)
                        actors.remove(actor)
                        actor = new_actor()
                        actors.append(actor)
                    idle.append(actor)
                    msg = _short_error(e)
                    if attempts[shard] <= spec.compute.max_retries:
                        log.warning("shard %s failed (attempt %d), retrying: %s", shard, attempts[shard], msg)
                        todo.append(shard)
                    else:
                        log.error("shard %s failed after %d attempts: %s", shard, attempts[shard], msg)
                        result.failed.append(ShardFailure(shard, attempts[shard], msg))
                        bar.shard_done()
                    continue
                idle.append(actor)
                result.done.append(stats)
                bar.add_images(stats["rows"])
                bar.shard_done()
        finally:
            bar.close()
            for a in actors:
                ray.kill(a)


def _short_error(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
